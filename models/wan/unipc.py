"""diffusers' UniPCMultistepScheduler with flow sigmas (the sampler of diffusers' released
Wan2.1 folders) as a traceable loop.

UniPC (Zhao et al. 2023) is a multistep solver in log-SNR time `lambda = log((1 - s) / s)`
on data predictions `x0 = x - s v`. Each step evaluates the model once, at the predictor's
sample `x_i`; that prediction first corrects `x_i` (UniC, from the previous step's sample
and predictions), then the predictor (UniP) takes the corrected sample to `s_{i+1}`. The
model is never evaluated at the corrected sample. With diffusers' Wan settings (order 2,
the B(h) = e^h - 1 variant "bh2", lower order at the first and last steps), step `i` uses
the predictions of steps `i` and `i - 1`, and the last step lands on its own `x0`.

Every coefficient depends only on the sigmas and the step index, so `UniPCConfig.schedule`
computes them on the host in float32, in the order diffusers' float32 tensors do, as
arrays (`UniPCSchedule`) that the loop indexes; the loop applies them in diffusers' order
of operations, so both round alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from models.pipeline_common import step_loop
from models.wan.sampling import NUM_TRAIN_TIMESTEPS

F32 = np.float32


def unipc_sigmas(num_steps: int, flow_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas `[num_steps + 1]` float32 ending in 0, model timesteps `[num_steps]` float32),
    as diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift).set_timesteps.

    In float64: `num_steps` levels spaced uniformly from 1 to 1/1000 (the last of
    `num_steps + 1` dropped), shifted `s -> shift s / (1 + (shift - 1) s)`, the first
    lowered by 1e-6 when it is 1 (log(1 - s) must stay finite); the timesteps are
    `1000 s` truncated to integers; the sigmas are then cast to float32. Raises ValueError
    unless `num_steps` is an integer >= 1 and `flow_shift` is finite and positive.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) \
            or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    if isinstance(flow_shift, bool) or not isinstance(flow_shift, numbers.Real) \
            or not (math.isfinite(flow_shift) and flow_shift > 0):
        raise ValueError(f"flow_shift must be a finite positive number; got {flow_shift!r}")
    s = np.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, int(num_steps) + 1)[:-1]
    s = flow_shift * s / (1 + (flow_shift - 1) * s)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    timesteps = (s * NUM_TRAIN_TIMESTEPS).astype(np.int64)       # torch's cast truncates
    return np.append(s, 0.0).astype(F32), timesteps.astype(F32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UniPCSchedule:
    """Sigmas, model timesteps and per-step coefficients of a UniPC run of `n` steps with
    `K = solver_order` (all float32 but `correct`; `[n, K - 1]` columns `j` refer to the
    prediction `j + 1` steps back; unused entries hold rho 0 and rk 1).

    Predictor at step i (data prediction `m`, earlier ones `m_j`, sample `x`):
      `pred_ratio * x - pred_phi * m - pred_b * sum_j pred_rho[j] * (m_j - m) / pred_rk[j]`.
    Corrector at step i (when `correct[i]`; `m0` the previous prediction, `last` the
    sample the previous predictor started from):
      `corr_ratio * last - corr_phi * m0 - corr_b * (sum_j corr_rho[j] * (m_j - m0) /
      corr_rk[j] + corr_rho_t * (m - m0))`, `m_j` counted back from `m0`.
    """
    sigmas: Float[np.ndarray, "n1"]
    timesteps: Float[np.ndarray, "n"]
    pred_ratio: Float[np.ndarray, "n"]
    pred_phi: Float[np.ndarray, "n"]
    pred_b: Float[np.ndarray, "n"]
    pred_rho: Float[np.ndarray, "n k1"]
    pred_rk: Float[np.ndarray, "n k1"]
    correct: Bool[np.ndarray, "n"]
    corr_ratio: Float[np.ndarray, "n"]
    corr_phi: Float[np.ndarray, "n"]
    corr_b: Float[np.ndarray, "n"]
    corr_rho: Float[np.ndarray, "n k1"]
    corr_rk: Float[np.ndarray, "n k1"]
    corr_rho_t: Float[np.ndarray, "n"]


def _lam(s):
    """log-SNR of flow sigma `s` in float32: +inf at s = 0."""
    with np.errstate(divide="ignore"):
        return np.log(F32(1) - s) - np.log(s)


def _coefficients(sigmas: np.ndarray, to: int, at: int, back: list[int], corrector: bool):
    """(ratio, phi, b, rhos, rks) of one update from sigma index `at` to `to` of order
    `len(back) + 1` using the predictions at sigma indices `back`; float32 as diffusers'
    multistep_uni_p/c_bh_update compute them (bh2: B(h) = expm1(-h))."""
    s_t, s_0 = sigmas[to], sigmas[at]
    order = len(back) + 1
    with np.errstate(divide="ignore", invalid="ignore"):
        h = _lam(s_t) - _lam(s_0)
        rks = [(_lam(sigmas[k]) - _lam(s_0)) / h for k in back] + [F32(1)]
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - F32(1)
        big_b = np.expm1(hh)
        b, factorial = [], 1
        for k in range(1, order + 1):
            b.append(h_phi_k * F32(factorial) / big_b)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - F32(1 / factorial)
    r = np.array([[F32(rk) ** (k - 1) for rk in rks] for k in range(1, order + 1)], F32)
    b = np.array(b, F32)
    if corrector:      # order 1: diffusers' fixed 0.5
        rhos = np.array([0.5], F32) if order == 1 else np.linalg.solve(r, b).astype(F32)
    else:              # order 2: diffusers' fixed 0.5; order 1 has no difference terms
        rhos = (np.zeros(0, F32) if order == 1 else np.array([0.5], F32) if order == 2
                else np.linalg.solve(r[:-1, :-1], b[:-1]).astype(F32))
    alpha_t = F32(1) - s_t
    return s_t / s_0, alpha_t * h_phi_1, alpha_t * big_b, rhos, np.array(rks[:-1], F32)


@dataclasses.dataclass(frozen=True)
class UniPCConfig:
    """The UniPC solver settings that are implemented (diffusers' names): `solver_order`
    1, 2 (Wan's) or 3, and `disable_corrector` (step indices i whose following step runs
    no corrector). The rest is fixed to Wan's settings: data prediction (predict_x0),
    bh2, lower order at the last steps, final sigma 0."""
    solver_order: int = 2
    disable_corrector: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.solver_order, bool) or self.solver_order not in (1, 2, 3):
            raise ValueError(f"UniPCConfig: solver_order must be 1, 2 or 3; got "
                             f"{self.solver_order!r}")
        if not isinstance(self.disable_corrector, tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in self.disable_corrector):
            raise ValueError(f"UniPCConfig: disable_corrector must be a tuple of step indices "
                             f">= 0; got {self.disable_corrector!r}")

    def schedule(self, num_steps: int, flow_shift: float) -> UniPCSchedule:
        """The sigmas, timesteps and coefficients of `num_steps` steps (host, numpy).

        Step i runs the predictor at order `min(K, i + 1, num_steps - i)` (diffusers'
        warm-up and lower_order_final) and, for i > 0 unless i - 1 is in
        `disable_corrector`, first the corrector at the previous step's order. Raises
        ValueError as `unipc_sigmas`.
        """
        sigmas, timesteps = unipc_sigmas(num_steps, flow_shift)
        n, k = int(num_steps), self.solver_order
        rows = {name: np.zeros(n, F32) for name in
                ("pred_ratio", "pred_phi", "pred_b", "corr_ratio", "corr_phi", "corr_b",
                 "corr_rho_t")}
        cols = {name: np.full((n, k - 1), fill, F32) for name, fill in
                (("pred_rho", 0), ("pred_rk", 1), ("corr_rho", 0), ("corr_rk", 1))}
        correct = np.zeros(n, bool)
        orders = [min(k, i + 1, n - i) for i in range(n)]
        for i in range(n):
            ratio, phi, b, rhos, rks = _coefficients(
                sigmas, i + 1, i, [i - j for j in range(1, orders[i])], corrector=False)
            rows["pred_ratio"][i], rows["pred_phi"][i], rows["pred_b"][i] = ratio, phi, b
            cols["pred_rho"][i, :len(rhos)], cols["pred_rk"][i, :len(rks)] = rhos, rks
            if i == 0 or i - 1 in self.disable_corrector:
                continue
            correct[i] = True
            ratio, phi, b, rhos, rks = _coefficients(
                sigmas, i, i - 1, [i - 1 - j for j in range(1, orders[i - 1])], corrector=True)
            rows["corr_ratio"][i], rows["corr_phi"][i], rows["corr_b"][i] = ratio, phi, b
            cols["corr_rho"][i, :len(rks)], cols["corr_rk"][i, :len(rks)] = rhos[:-1], rks
            rows["corr_rho_t"][i] = rhos[-1]
        return UniPCSchedule(sigmas=sigmas, timesteps=timesteps, correct=correct, **rows,
                             **cols)


def _check_schedule(s) -> tuple[int, int]:
    """(steps n, solver order K) of a schedule whose arrays agree; TypeError if it is not a
    UniPCSchedule, ValueError if its arrays disagree."""
    if not isinstance(s, UniPCSchedule):
        raise TypeError(f"schedule must be a UniPCSchedule (UniPCConfig.schedule); got "
                        f"{type(s).__name__}")
    if jnp.ndim(s.sigmas) != 1 or s.sigmas.shape[0] < 2:
        raise ValueError(f"schedule.sigmas must be 1-D with at least 2 values (steps + 1); "
                         f"got shape {list(jnp.shape(s.sigmas))}")
    n = s.sigmas.shape[0] - 1
    if jnp.ndim(s.pred_rho) != 2:
        raise ValueError(f"schedule.pred_rho must be 2-D [steps, solver order - 1]; got shape "
                         f"{list(jnp.shape(s.pred_rho))}")
    k1 = s.pred_rho.shape[1]
    for f in dataclasses.fields(s):
        if f.name == "sigmas":
            continue
        want = (n, k1) if f.name.endswith(("_rho", "_rk")) else (n,)
        if tuple(jnp.shape(getattr(s, f.name))) != want:
            raise ValueError(f"schedule.{f.name} must have shape {list(want)} (steps, "
                             f"solver order - 1); got {list(jnp.shape(getattr(s, f.name)))}")
    if not 0 <= k1 <= 2:
        raise ValueError(f"schedule is for solver order {k1 + 1}; orders 1 to 3 exist")
    return n, k1 + 1


def unipc_loop(velocity: Callable, x: Float[Array, "b ..."], schedule: UniPCSchedule, *,
               dense_steps: int = 0, on_step: Callable | None = None
               ) -> Float[Array, "b ..."]:
    """UniPC steps over `schedule` (see the module docstring), the final sample.

    Traceable (call it under `jax.jit`; the schedule's arrays may be traced); the number
    of steps is `len(schedule.sigmas) - 1`. `velocity(x [B, ...] float32, t [B] float32,
    dense: bool)` is given the model timestep `t = schedule.timesteps[i]` (diffusers'
    integer timesteps, not `1000 * sigma` and not the sigma that
    `models.pipeline_common.euler_loop` gives) and returns the flow-matching velocity.
    It is traced once per value of `dense`; the steps run in
    `models.pipeline_common.step_loop` (`dense_steps` first steps dense, `on_step(i)`
    after step i). `x` stays float32. The loop carries the sample, the sample the last
    predictor started from and the solver order's previous data predictions.

    Raises TypeError if `schedule` is not a UniPCSchedule, ValueError if its arrays
    disagree in shape, if `x` has no batch axis, or if `dense_steps` is not an integer in
    [0, steps].
    """
    n, k = _check_schedule(schedule)
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have a batch axis ([B, ...]); got shape {list(jnp.shape(x))}")
    s = jax.tree.map(jnp.asarray, schedule)
    b = x.shape[0]

    def step(i, carry, dense):
        x, last, prev = carry[0], carry[1], carry[2:]       # prev[j]: j + 1 steps back
        v = velocity(x, jnp.full((b,), s.timesteps[i], jnp.float32), dense)
        m = x - s.sigmas[i] * v.astype(jnp.float32)        # data prediction at x
        # Corrector: redo the last step from `last` with `m` as well.
        m0 = prev[0]
        res = s.corr_rho_t[i] * (m - m0)
        if k > 1:
            res = sum(s.corr_rho[i, j - 1] * ((prev[j] - m0) / s.corr_rk[i, j - 1])
                      for j in range(1, k)) + res
        fixed = s.corr_ratio[i] * last - s.corr_phi[i] * m0 - s.corr_b[i] * res
        x = jnp.where(s.correct[i], fixed, x)
        # Predictor from the (corrected) sample.
        nxt = s.pred_ratio[i] * x - s.pred_phi[i] * m
        if k > 1:
            nxt = nxt - s.pred_b[i] * sum(
                s.pred_rho[i, j - 1] * ((prev[j - 1] - m) / s.pred_rk[i, j - 1])
                for j in range(1, k))
        return (nxt, x, m) + prev[:-1]

    x = jnp.asarray(x, jnp.float32)
    carry = (x, x) + tuple(jnp.zeros_like(x) for _ in range(k))
    return step_loop(step, carry, n, dense_steps=dense_steps, on_step=on_step)[0]
