"""The backend table behind `implementation=`: names, "auto" per shape and its fallbacks,
clear refusals of an explicit backend that cannot run, the deprecated "pallas" name, the
kernel folder layout and device facts read from the device."""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pisa_jax as pj
from pisa_jax.kernels import _common, dispatch
from pisa_jax.kernels.dispatch import AttentionInputs, resolve


def _qkv(shape=(1, 100, 2, 16), dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3)]


@pytest.fixture
def hopper(monkeypatch):
    """Pretend to be on a Hopper GPU (only the choice is made; nothing is run)."""
    monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "compute_capability", lambda: "9.0")
    return monkeypatch


def _choice(impl="auto", dtype=jnp.bfloat16, block_size=64, head_dim=128, t=32768,
            interpret=None):
    backend, _ = resolve(impl, interpret, dtype=jnp.dtype(dtype),
                         attention=AttentionInputs(block_size, head_dim, t))
    return backend.name


# ---------------------------------------------------------------------------- names

def test_unknown_name_lists_the_valid_ones():
    msg = r"implementation must be one of \('auto', 'triton', 'mosaic', 'reference'\); got 'cuda'"
    with pytest.raises(ValueError, match=msg):
        pj.piecewise_sparse_attention(*_qkv(), implementation="cuda")
    with pytest.raises(ValueError, match=msg):
        pj.select_blocks(pj.block_statistics(*_qkv(), implementation="reference"),
                         implementation="cuda")
    with pytest.raises(ValueError, match=msg):
        pj.AttentionPolicy(implementation="cuda")


def test_every_name_but_auto_is_a_row_of_the_table():
    from pisa_jax._checks import IMPLEMENTATIONS
    assert set(IMPLEMENTATIONS) - {"auto"} == set(dispatch.BACKENDS)
    for name, backend in dispatch.BACKENDS.items():
        assert backend.name == name


def test_pallas_warns_and_runs_the_triton_kernels():
    q, k, v = _qkv()
    opts = dict(density=0.3, block_size=16, use_bias=True, interpret=True)
    with pytest.warns(DeprecationWarning, match="use implementation='triton'") as record:
        old = pj.piecewise_sparse_attention(q, k, v, implementation="pallas", **opts)
    assert record[0].filename == __file__          # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = pj.piecewise_sparse_attention(q, k, v, implementation="triton", **opts)
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    ref = pj.piecewise_sparse_attention(q, k, v, implementation="reference", **opts)
    assert not np.array_equal(np.asarray(new), np.asarray(ref))   # the kernels did run


def test_policy_stores_pallas_as_triton_with_a_warning():
    with pytest.warns(DeprecationWarning, match="use implementation='triton'") as record:
        policy = pj.AttentionPolicy(implementation="pallas")
    assert record[0].filename == __file__
    assert policy.implementation == "triton"
    assert pj.AttentionPolicy(implementation="mosaic").implementation == "mosaic"


# ---------------------------------------------------------------- "auto" and the table

@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU choice")
def test_auto_off_the_gpu_is_the_reference():
    assert _choice() == "reference"
    assert resolve("auto", None)[0].name == "reference"
    q, k, v = _qkv()
    opts = dict(density=0.3, block_size=16, use_bias=True)
    got = pj.piecewise_sparse_attention(q, k, v, **opts)
    want = pj.piecewise_sparse_attention(q, k, v, implementation="reference", **opts)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_table_bounds_are_inclusive():
    for block_size, (table, beyond) in dispatch.AUTO_TABLE.items():
        for (bound, name), nxt in zip(table, table[1:]):
            assert dispatch.table_choice(bound, block_size) == name
            assert dispatch.table_choice(bound + 1, block_size) == nxt[1]
        last = table[-1][0] if table else 0
        assert dispatch.table_choice(last + 1, block_size) == beyond
        assert dispatch.table_choice(1, block_size) == (table[0][1] if table else beyond)
    assert dispatch.table_choice(4608, 32) == "triton"      # a block size not in the table


def test_table_follows_the_measured_shapes():
    # flux-1024, flux-2048, seq-32k, wan-720p: the faster backend in the runs cited beside
    # the table (block 64 at flux-1024: the FLUX forward, where Mosaic gains nothing and
    # compiles slower; the others: the whole op).
    shapes = (4608, 16896, 32768, 75776)
    assert [dispatch.table_choice(t, 64) for t in shapes] == \
        ["triton", "triton", "mosaic", "triton"]
    assert [dispatch.table_choice(t, 128) for t in shapes] == ["mosaic"] * 4
    assert dispatch.table_choice(1 << 20, 128) == "triton"   # beyond the measured range


def test_auto_keeps_triton_on_the_gpu_until_mosaic_is_validated(hopper):
    hopper.setattr(dispatch, "MOSAIC_VALIDATED", False)
    assert {_choice(t=t, block_size=bs) for t in (4608, 16896, 32768, 75776)
            for bs in (64, 128)} == {"triton"}


def test_auto_per_shape_once_mosaic_is_validated(hopper):
    hopper.setattr(dispatch, "MOSAIC_VALIDATED", True)
    assert [_choice(t=t) for t in (4608, 16896, 32768, 75776)] == \
        ["triton", "triton", "mosaic", "triton"]
    # Inputs Mosaic does not take fall back to Triton, and float64 to the reference.
    assert _choice(dtype=jnp.float32) == "triton"
    assert [_choice(t=t, block_size=128) for t in (4608, 16896, 32768, 75776, 1 << 20)] == \
        ["mosaic"] * 4 + ["triton"]
    assert _choice(block_size=32) == "triton"
    assert _choice(head_dim=256) == "triton"
    assert _choice(interpret=True) == "triton"
    with jax.enable_x64(True):
        assert _choice(dtype=jnp.float64) == "reference"
    # Stages without an attention (statistics, selection) run Triton's kernels.
    assert resolve("auto", None, dtype=jnp.dtype(jnp.bfloat16))[0].name == "triton"
    assert resolve("auto", None)[0].top_k_kernel
    # Several GPUs in the process, or a mesh around the call: Triton (where the Mosaic
    # kernel is untested or XLA refuses it).
    hopper.setattr(dispatch, "gpu_count", lambda: 2)
    assert {_choice(t=t) for t in (4608, 32768)} == {"triton"}
    hopper.setattr(dispatch, "gpu_count", lambda: 1)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    seen = []

    def traced(x):
        seen.append(_choice())
        return x
    spec = jax.sharding.PartitionSpec("batch")
    jax.jit(jax.shard_map(traced, mesh=mesh, in_specs=spec, out_specs=spec))(jnp.ones(2))
    with jax.set_mesh(mesh):
        jax.jit(traced)(jnp.ones(2))
    jax.jit(traced)(jnp.ones(2))
    assert seen == ["triton", "triton", "mosaic"]
    # A GPU that is not a Hopper: no Mosaic, no error.
    hopper.setattr(dispatch, "compute_capability", lambda: "8.0")
    assert _choice() == "triton"


def test_auto_on_the_gpu_falls_back_to_the_reference_where_triton_cannot_run(hopper):
    assert _choice(dtype=jnp.float32, block_size=128) == "reference"


# ------------------------------------------------------- explicit backends that cannot run

@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_mosaic_off_the_gpu_is_refused_naming_reason_and_alternatives():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    msg = (r"implementation='mosaic' cannot run here: there is no GPU \(JAX's default backend "
           r"is 'cpu'\); use implementation='triton' \(interpret=True off a GPU\), "
           r"'reference', or 'auto'")
    with pytest.raises(ValueError, match=msg):
        pj.piecewise_sparse_attention(q, k, v, implementation="mosaic")
    with pytest.raises(ValueError, match=msg):
        pj.block_statistics(q, k, v, implementation="mosaic")
    stats = pj.block_statistics(q, k, v, block_size=16, implementation="reference")
    with pytest.raises(ValueError, match=msg):
        pj.select_blocks(stats, implementation="mosaic")
    with pytest.raises(ValueError, match="has no interpret mode"):
        pj.piecewise_sparse_attention(q, k, v, implementation="mosaic", interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_triton_off_the_gpu_without_interpret_is_refused():
    with pytest.raises(ValueError, match=r"implementation='triton' cannot run here: there is "
                                         r"no GPU.*'reference', or 'auto'"):
        pj.piecewise_sparse_attention(*_qkv(), implementation="triton", interpret=False)


def test_mosaic_on_another_gpu_is_refused(hopper):
    hopper.setattr(dispatch, "compute_capability", lambda: "8.0")
    with pytest.raises(ValueError, match=r"compute capability 8.0, not 9.x \(Hopper\); use "
                                         r"implementation='triton'"):
        _choice("mosaic")


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(dtype=jnp.float32), TypeError,
     r"implementation='mosaic' takes bfloat16, float16 inputs; got float32: use "
     r"implementation='triton'"),
    (dict(block_size=32), ValueError, r"takes block_size 64 or 128; got 32; use implementation="),
    (dict(head_dim=256), ValueError, r"head dims up to 128; got D = 256; use implementation="),
])
def test_mosaic_refuses_inputs_it_does_not_take(hopper, kw, error, pattern):
    assert _choice("mosaic") == "mosaic"
    with pytest.raises(error, match=pattern):
        _choice("mosaic", **kw)


def test_mosaic_statistics_stage_runs_triton(hopper):
    backend, interpret = resolve("mosaic", None, dtype=jnp.dtype(jnp.float32))
    assert backend.statistics is dispatch.BACKENDS["triton"].statistics
    assert backend.top_k_kernel and not interpret


# ------------------------------------------------------------ layout and device facts

@pytest.mark.parametrize("module", [
    "pisa_jax.kernels.pallas_triton.block_statistics",
    "pisa_jax.kernels.pallas_triton.piecewise_attention",
    "pisa_jax.kernels.pallas_triton.top_k",
    "pisa_jax.kernels.pallas_triton.config",
    "pisa_jax.kernels.pallas_mosaic_gpu.piecewise_attention",
    "pisa_jax.kernels.pallas_mosaic_gpu.config",
    "pisa_jax.kernels.dispatch",
])
def test_kernel_modules_live_in_one_folder_per_backend(module):
    assert importlib.import_module(module) is not None


@pytest.mark.parametrize("old", ["block_statistics", "piecewise_attention", "top_k", "configs"])
def test_old_flat_kernel_modules_are_gone(old):
    assert importlib.util.find_spec(f"pisa_jax.kernels.{old}") is None


def test_shared_memory_comes_from_the_device(monkeypatch):
    from pisa_jax.kernels.pallas_mosaic_gpu import config as mosaic_config
    from pisa_jax.kernels.pallas_triton import config as triton_config
    sizes = {}
    for device in (SimpleNamespace(shared_memory_per_block_optin=99 * 1024), SimpleNamespace()):
        monkeypatch.setattr(_common.jax, "devices", lambda d=device: [d])
        _common.shared_memory_per_block.cache_clear()
        sizes[len(vars(device))] = (
            _common.shared_memory_per_block(), triton_config.smem_budget(),
            mosaic_config.default_config(64, 128, 2, 32, 128),
            triton_config.attention_config(128, 64, jnp.bfloat16).num_stages)
    _common.shared_memory_per_block.cache_clear()
    assert sizes[0][0] == 227 * 1024 and sizes[1][0] == 99 * 1024    # Hopper where unsaid
    assert sizes[1][1] == sizes[1][0] - (sizes[0][0] - sizes[0][1])
    small, full = sizes[1][2], sizes[0][2]
    assert full.query_blocks_per_cta == 2 and small.query_blocks_per_cta == 1
    assert small.shared_memory_bytes(64, 128, 2, 32, 128) <= 99 * 1024
    assert sizes[1][3] < sizes[0][3]          # fewer Triton pipeline stages fit
