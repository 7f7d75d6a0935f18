"""CPU checks of the benchmark helpers that turn measurements into figures."""

from __future__ import annotations

from types import SimpleNamespace as NS

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_op
from benchmarks.profile_op import gpu_kernel_times, stage_of
from pisa_jax.kernels import configs


def _event(name, start, duration):
    return NS(name=name, start_ns=float(start), duration_ns=float(duration))


def test_gpu_kernel_times_adds_stream_events_only():
    rng = np.random.default_rng(0)
    durations = rng.uniform(1e3, 5e4, size=(2, 3))     # 2 calls x 3 kernels, ns
    names = ["pisa_block_statistics", "pisa_top_k", "pisa_piecewise_attention"]
    events, t = [], 1e6
    for call in range(2):
        for name, dur in zip(names, durations[call]):
            events.append(_event(name, t, dur))
            t += dur + 500.0                            # a 0.5 us gap between kernels
    planes = [
        NS(name="/host:CPU", lines=[NS(name="python", events=[_event("host", 0, 9e9)])]),
        NS(name="/device:GPU:0", lines=[
            NS(name="XLA Ops", events=[_event("grouping", 0, 9e9)]),   # not a stream
            NS(name="Stream #13(Compute)", events=events),
        ]),
    ]
    times, span = gpu_kernel_times(planes, calls=2)
    for k, name in enumerate(names):
        assert times[name] == pytest.approx(durations[:, k].sum() / 2 / 1e3)
    assert span == pytest.approx((durations.sum() + 5 * 500.0) / 2 / 1e3)
    assert {stage_of(n) for n in times} == {"statistics", "top-k", "attention kernel"}
    assert stage_of("loop_pad_fusion").startswith("XLA")


def test_dense_comparison_reports_both_speedups(monkeypatch):
    # GPU-free: the trace and the wall clock are replaced by drawn figures.
    rng = np.random.default_rng(1)
    dense_kernels = dict(zip(["cudnn_fprop", "transpose"], rng.uniform(100.0, 900.0, 2)))
    op_wall, dense_wall = rng.uniform(1e-4, 1e-2, 2)
    op = object()   # stands for the jitted PISA op; anything else timed is the dense one
    monkeypatch.setattr(profile_op, "kernel_times", lambda fn, args, calls: (dense_kernels, 0.0))
    monkeypatch.setattr(profile_op, "timeit", lambda fn, *a: op_wall if fn is op else dense_wall)
    op_gpu_ms = float(rng.uniform(0.1, 1.0))
    row = profile_op.dense_comparison(op, (), op_gpu_ms, calls=3)
    dense_gpu_ms = sum(dense_kernels.values()) / 1e3
    assert row["dense_gpu_ms"] == pytest.approx(dense_gpu_ms)
    assert row["speedup_gpu_time"] == pytest.approx(dense_gpu_ms / op_gpu_ms)
    assert row["op_wall_ms"] == pytest.approx(op_wall * 1e3)
    assert row["speedup_wall_clock"] == pytest.approx(dense_wall / op_wall)


def test_gpu_kernel_times_without_gpu_events_says_so():
    planes = [NS(name="/host:CPU", lines=[NS(name="python", events=[_event("x", 0, 1)])])]
    with pytest.raises(RuntimeError, match="no GPU kernel events"):
        gpu_kernel_times(planes, calls=1)


@pytest.mark.parametrize("block_size,dtype,stages", [
    (64, jnp.bfloat16, 3),    # swept: 3 stages
    (128, jnp.bfloat16, 3),   # swept: 3 stages fit (two 64 KiB k/v tiles in flight)
    (64, jnp.float32, 2),     # float32 tiles keep at most 2 stages
    (128, jnp.float32, 2),
])
def test_attention_stages_fit_shared_memory(block_size, dtype, stages):
    cfg = configs.attention_config(128, block_size, dtype)
    assert cfg.num_stages == stages
    tile = block_size * 128 * jnp.dtype(dtype).itemsize
    assert tile + (cfg.num_stages - 1) * 2 * tile <= configs._SMEM_BUDGET
