"""The UniPC flow-matching solver (`models.wan.unipc`) against diffusers'
UniPCMultistepScheduler: its sigmas and timesteps, the sample after every step, the loop's
contract (dense steps, step callback, tracing) and its errors.

Fixture: tests/fixtures/make_wan_unipc.py (diffusers stepped with the velocity
`v(x, t) = A x + B (t / 1000) N` from X, for Wan's settings and a few variants).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.checkpoint import CheckpointError
from models.wan.pipeline_loading import SchedulerConfig
from models.wan.unipc import UniPCConfig, UniPCSchedule, unipc_loop, unipc_sigmas
from tests.helpers import relative_error

REF = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "wan_unipc.npz"))
CASES = sorted(k[:-len("_sigmas")] for k in REF.files
               if k.endswith("_sigmas") and not k.startswith("pipe_"))
A, B, N, X = (jnp.asarray(REF[k]) for k in "ABNX")


def settings(name):
    """(steps, flow_shift, UniPCConfig) of a fixture case."""
    config = UniPCConfig(int(REF[f"{name}_solver_order"]),
                         tuple(int(i) for i in REF[f"{name}_disable_corrector"]))
    return len(REF[f"{name}_timesteps"]), float(REF[f"{name}_shift"]), config


def fake_velocity(x, t, dense):
    return A * x + B * (t[:, None, None, None] / 1000) * N


def test_the_fixture_covers_wan_and_its_variants():
    assert len(CASES) == 15
    assert {settings(c)[2] for c in CASES} == {
        UniPCConfig(), UniPCConfig(1), UniPCConfig(3), UniPCConfig(2, (0, 3))}


@pytest.mark.parametrize("name", CASES)
def test_sigmas_and_timesteps_equal_diffusers(name):
    n, shift, config = settings(name)
    sigmas, timesteps = unipc_sigmas(n, shift)
    assert sigmas.dtype == timesteps.dtype == np.float32
    np.testing.assert_array_equal(sigmas, REF[f"{name}_sigmas"])
    np.testing.assert_array_equal(timesteps, REF[f"{name}_timesteps"])   # integers
    schedule = config.schedule(n, shift)
    np.testing.assert_array_equal(schedule.sigmas, sigmas)
    np.testing.assert_array_equal(
        SchedulerConfig(shift, "UniPCMultistepScheduler").sigmas(n), sigmas)


@pytest.mark.parametrize("name", CASES)
def test_the_loop_follows_diffusers_step_by_step(name):
    n, shift, config = settings(name)
    seen = []            # (x, t) at each model evaluation, in order

    def velocity(x, t, dense):
        jax.debug.callback(lambda x, t: seen.append((np.asarray(x), np.asarray(t))), x, t,
                           ordered=True)
        return fake_velocity(x, t, dense)

    out = jax.jit(lambda s: unipc_loop(velocity, X, s))(config.schedule(n, shift))
    jax.effects_barrier()
    ref = REF[f"{name}_latents"]                      # [n, *X.shape], after each step
    assert len(seen) == n
    np.testing.assert_array_equal(np.stack([t for _, t in seen]),
                                  np.repeat(REF[f"{name}_timesteps"][:, None], 2, 1))
    # Step i evaluates the model at the sample step i - 1 gave.
    got = [x for x, _ in seen[1:]] + [np.asarray(out)]
    errors = [relative_error(g, r) for g, r in zip(got, ref)]
    # float32 on both sides; the solver coefficients come from numpy instead of torch
    # (an ulp here and there in log / expm1). Measured at most 3.0e-7 (50 steps).
    assert max(errors) < 1e-6, errors
    assert np.abs(ref[-1] - np.asarray(X)).max() > 0.5       # the solver moved


def test_dense_steps_split_the_same_run_and_on_step_is_called_once_per_step():
    n, shift, config = 5, 3.0, UniPCConfig()
    schedule = config.schedule(n, shift)
    for dense_steps in (0, 2, 5):
        traced, dense_at, steps = [], [], []

        def velocity(x, t, dense):
            traced.append(dense)
            jax.debug.callback(lambda: dense_at.append(dense), ordered=True)
            return fake_velocity(x, t, dense)

        on_step = lambda i: jax.debug.callback(lambda i: steps.append(int(i)), i, ordered=True)
        out = jax.jit(lambda s: unipc_loop(velocity, X, s, dense_steps=dense_steps,
                                           on_step=on_step))(schedule)
        jax.effects_barrier()
        assert traced == [True] * (dense_steps > 0) + [False] * (dense_steps < n)
        assert dense_at == [True] * dense_steps + [False] * (n - dense_steps)
        assert steps == list(range(n))
        if dense_steps == 0:
            first = out
        np.testing.assert_array_equal(out, first)
    assert relative_error(first, REF["wan_3.0_5_latents"][-1]) < 1e-6


def test_the_coefficients_are_inputs_and_the_last_step_lands_on_its_prediction():
    config, traces = UniPCConfig(), []

    def velocity(x, t, dense):
        traces.append(dense)
        return fake_velocity(x, t, dense)
    run = jax.jit(lambda s: unipc_loop(velocity, X, s))
    a, b = run(config.schedule(6, 3.0)), run(config.schedule(6, 5.0))
    assert traces == [False]                           # a new shift traces nothing
    assert relative_error(a, b) > 1e-3                 # ... and the shift is used
    s = config.schedule(6, 3.0)
    assert s.pred_ratio[-1] == 0 and s.pred_phi[-1] == -1 and s.pred_rho[-1, 0] == 0
    assert not s.correct[0] and s.correct[1:].all()
    # Order 1 at the first and last step (diffusers' warm-up and lower_order_final).
    np.testing.assert_array_equal(s.pred_rho[:, 0], [0, .5, .5, .5, .5, 0])
    assert np.isfinite(a).all()


def test_scheduler_config_reads_the_implemented_unipc_settings(tmp_path):
    path = tmp_path / "scheduler_config.json"
    config = json.loads(str(REF["pipe_unguided_config"])) | dict(
        solver_order=3, solver_type="midpoint", disable_corrector=[0, 3])
    path.write_text(json.dumps(config))
    sched = SchedulerConfig.from_diffusers(str(path))       # diffusers runs midpoint as bh2
    assert sched == SchedulerConfig(5.0, "UniPCMultistepScheduler", UniPCConfig(3, (0, 3)))
    assert sched.solver == "unipc" and SchedulerConfig(5.0).solver == "euler"
    plan = sched.plan(4)
    assert isinstance(plan, UniPCSchedule) and plan.pred_rho.shape == (4, 2)
    path.write_text(json.dumps(config | dict(solver_type="bh1", thresholding=True)))
    with pytest.raises(CheckpointError, match=r"scheduler_config.json: UniPCMultistepScheduler "
                                              r"settings not implemented: thresholding=True "
                                              r"\(implemented: False\), solver_type='bh1'"):
        SchedulerConfig.from_diffusers(str(path))


def test_bad_arguments_raise_clear_errors():
    schedule = UniPCConfig().schedule(3, 3.0)
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1; got 0"):
        unipc_sigmas(0, 3.0)
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1; got 2.5"):
        UniPCConfig().schedule(2.5, 3.0)
    with pytest.raises(ValueError, match="flow_shift must be a finite positive number; got -1"):
        unipc_sigmas(4, -1.0)
    with pytest.raises(ValueError, match="flow_shift must be a finite positive number; got inf"):
        unipc_sigmas(4, float("inf"))
    with pytest.raises(ValueError, match="solver_order must be 1, 2 or 3; got 4"):
        UniPCConfig(4)
    with pytest.raises(ValueError, match=r"disable_corrector must be a tuple .* got \[1\]"):
        UniPCConfig(2, [1])
    with pytest.raises(ValueError, match="unipc settings were given with source"):
        SchedulerConfig(3.0, "FlowMatchEulerDiscreteScheduler", UniPCConfig())
    with pytest.raises(ValueError, match="source must be"):
        SchedulerConfig(3.0, "DDIMScheduler")
    with pytest.raises(TypeError, match="unipc must be a UniPCConfig or None; got dict"):
        SchedulerConfig(3.0, "UniPCMultistepScheduler", {"solver_order": 2})
    with pytest.raises(TypeError, match="schedule must be a UniPCSchedule .* got ndarray"):
        unipc_loop(fake_velocity, X, schedule.sigmas)
    for bad in (4, -1, True, 1.5):      # True is not 1 dense step
        with pytest.raises(ValueError, match=rf"dense_steps must be in \[0, 3\] .*an integer; "
                                             rf"got {bad}"):
            unipc_loop(fake_velocity, X, schedule, dense_steps=bad)
    with pytest.raises(ValueError, match=r"schedule.corr_rk must have shape \[3, 1\] .* got "
                                         r"\[3, 2\]"):
        unipc_loop(fake_velocity, X, dataclasses.replace(
            schedule, corr_rk=np.ones((3, 2), np.float32)))
    with pytest.raises(ValueError, match=r"schedule.pred_rho must be 2-D"):
        unipc_loop(fake_velocity, X, dataclasses.replace(schedule, pred_rho=np.zeros(3)))
    with pytest.raises(ValueError, match=r"schedule.sigmas must be 1-D with at least 2"):
        unipc_loop(fake_velocity, X, dataclasses.replace(schedule, sigmas=np.zeros(1)))
    with pytest.raises(ValueError, match="x must have a batch axis"):
        unipc_loop(fake_velocity, jnp.float32(1), schedule)
