"""CPU checks of the benchmark helpers that turn measurements into figures."""

from __future__ import annotations

from types import SimpleNamespace as NS

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import profile_op
from benchmarks.profile_op import gpu_kernel_times, stage_of
from pisa_jax.kernels.pallas_triton import config as configs


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


def test_mosaic_kernel_counts_as_the_attention_kernel():
    # Mosaic GPU kernels appear in traces under a generic name, not the call's name.
    from benchmarks.flux import kernel_group
    assert stage_of("entry_mosaic_gpu_kernel") == "attention kernel"
    assert stage_of("loop_pad_fusion_2").startswith("XLA")
    assert [kernel_group(n) for n in (
        "entry_mosaic_gpu_kernel", "pisa_piecewise_attention", "pisa_block_statistics",
        "pisa_top_k", "cudnn_generated_fort_native_sdpa_sm90", "sm90_fmha_fwd",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_NNT", "loop_transpose_fusion_37")] == [
        "PISA attention", "PISA attention", "PISA statistics", "PISA top-k", "cuDNN attention",
        "cuDNN attention", "other", "other"]


def test_dense_comparison_reports_both_speedups(monkeypatch):
    # GPU-free: the trace and the wall clock are replaced by fixed figures, and the
    # expected row is worked out by hand (not by the formula under test).
    op = object()   # stands for the jitted PISA op; anything else timed is the dense one
    monkeypatch.setattr(profile_op, "kernel_times",
                        lambda fn, args, calls: ({"cudnn_fprop": 900.0, "transpose": 300.0}, 0.0))
    monkeypatch.setattr(profile_op, "timeit", lambda fn, *a: 0.002 if fn is op else 0.005)
    row = profile_op.dense_comparison(op, (), op_gpu_ms=0.4, calls=3)
    assert row == pytest.approx({"dense_gpu_ms": 1.2, "dense_wall_ms": 5.0, "op_wall_ms": 2.0,
                                 "speedup_gpu_time": 3.0, "speedup_wall_clock": 2.5})


def test_gpu_kernel_times_without_gpu_events_says_so():
    planes = [NS(name="/host:CPU", lines=[NS(name="python", events=[_event("x", 0, 1)])])]
    with pytest.raises(RuntimeError, match="no GPU kernel events"):
        gpu_kernel_times(planes, calls=1)


HOPPER_SMEM = 227 * 1024      # shared memory one block may use on an H100/H200


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 128, 256])
def test_pipelined_tiles_fit_hopper_shared_memory_and_use_it(head_dim, block_size, dtype):
    # Triton keeps num_stages - 1 tiles in flight while one is consumed: q resident plus
    # k and v per stage (attention), q, k and v per stage (statistics). Every config must
    # fit the hardware's shared memory, and a stage is only dropped when one more would
    # not fit the budget (or exceed the swept count).
    d = configs.supported_head_dim(head_dim)
    tile = block_size * d * jnp.dtype(dtype).itemsize
    for cfg, resident, per_stage, table in (
            (configs.attention_config(head_dim, block_size, dtype), tile, 2 * tile,
             configs._ATTENTION.get((d, block_size, min(jnp.dtype(dtype).itemsize, 2)))),
            (configs.statistics_config(head_dim, block_size, dtype), 0, 3 * tile,
             configs._STATISTICS.get((d, block_size)))):
        in_flight = resident + (cfg.num_stages - 1) * per_stage
        assert cfg.num_stages >= 1 and in_flight <= HOPPER_SMEM
        swept = (table or cfg).num_stages
        if cfg.num_stages < swept and (jnp.dtype(dtype).itemsize <= 2 or cfg.num_stages < 2):
            assert in_flight + per_stage > configs.smem_budget()


def test_swept_configs_are_the_ones_used():
    # The launch configs measured best on the H200 (benchmarks/RESULTS.md) reach the kernels.
    cfg = configs.attention_config(128, 64, jnp.bfloat16)
    assert (cfg.num_warps, cfg.num_stages, cfg.indices_in_registers) == (4, 3, True)
    cfg = configs.statistics_config(128, 64, jnp.bfloat16)
    assert (cfg.num_warps, cfg.num_stages) == (8, 3)


def test_attention_benchmark_help_runs_without_a_gpu():
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "benchmarks/attention.py", "--help"],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "--shapes" in out.stdout


def test_attention_benchmark_plots_mosaic_rows_where_present(tmp_path):
    # One shape with Mosaic rows, one without (skipped or failed there): both are drawn.
    from benchmarks import attention
    pisa = {"0.15": {"bias": 1.0, "no_bias": 0.9}}
    results = {"flux-1024": {"cudnn_ms": 2.0, "pisa": pisa, "pisa_mosaic": pisa},
               "flux-2048": {"cudnn_ms": 6.0, "pisa": pisa, "mosaic_error": "ValueError"}}
    attention.plot(results, tmp_path / "a.png", device="test")
    assert (tmp_path / "a.png").stat().st_size > 0


def test_mosaic_rows_report_a_failure_instead_of_raising(monkeypatch):
    from benchmarks import attention

    def broken(*a, **k):
        raise RuntimeError("no Mosaic here")
    monkeypatch.setattr(attention, "mosaic_fn", broken)
    assert attention.mosaic_rows(None, None, None, [0.15]) == {
        "mosaic_error": "RuntimeError: no Mosaic here"}


@pytest.mark.parametrize("module, argv, message", [
    ("mosaic", ["--stages", "0"], "--stages: expected an integer >= 1, got '0'"),
    ("mosaic", ["--out", "/no/such/folder/m.json"], "cannot write /no/such/folder/m.json"),
    ("attention", ["--densities", "0.15,2"], "expected comma-separated numbers in (0, 1]"),
    ("profile_op", ["--calls", "0"], "--calls: expected an integer >= 1, got '0'"),
    ("mosaic", ["--memory-only", "--block-size", "96"], "invalid choice: 96"),
    ("mosaic_blocks", ["--block-sizes", "64,96"],
     "expected comma-separated block sizes of 64, 128, got '64,96'"),
    ("mosaic_blocks", ["--scaling", "0.1,0"], "expected comma-separated densities in (0, 1]"),
    ("mosaic_blocks", ["--scaling", "0.2,0.2"],
     "--scaling: expected at least two different densities (a line is fitted through them), "
     "got 0.2,0.2"),
    ("stats_kernel", ["--per-program", "8,0"], "--per-program: expected positive integers"),
    ("stats_kernel", ["--runs", "1,0"], "--runs: expected positive numbers, got '1,0'"),
    ("stats_kernel", ["--shapes", "flux-4096"], "expected names from flux-1024, flux-2048"),
])
def test_benchmark_flags_are_refused_before_any_work(module, argv, message, capsys):
    # Parsed before a device is touched: a clear usage error (exit 2), not a traceback or
    # a silently replaced value (--stages 0 used to run with 2 stages).
    import importlib
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_wan_vae_memory_writes_both_plans_of_both_directions(tmp_path):
    import json
    from benchmarks import wan_vae_memory
    out = tmp_path / "m.json"
    wan_vae_memory.main(["--sizes", "9x16x24", "--out", str(out)])
    r = json.loads(out.read_text())["sizes"]["9x16x24"]
    assert set(r) == {f"{m}_{s}_temp_gib" for m in ("decode", "encode")
                      for s in ("streaming", "whole_clip")}
    assert all(v > 0 for v in r.values())


@pytest.mark.parametrize("sizes", ["8x16x16", "9x12x16", "9x16"])
def test_wan_vae_memory_refuses_bad_sizes(sizes, capsys):
    from benchmarks import wan_vae_memory
    with pytest.raises(SystemExit) as exit_info:
        wan_vae_memory.main(["--sizes", sizes])
    assert exit_info.value.code == 2 and repr(sizes) in capsys.readouterr().err
