"""The Flax Wan2.1 model: attention policies, 3D token order, input checks, sampling."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pisa_jax.nn as pnn
from models.wan import Wan, WanConfig, default_policies, denoise, pad_text, schedule
from models.wan.config import WAN_T2V_1_3B, WAN_T2V_14B
from pisa_jax import layer_policies
from tests.helpers import jit_error, relative_error

TINY = WanConfig(dim=32, num_heads=2, num_layers=3, ffn_dim=64, text_dim=24, freq_dim=32,
                 text_len=16)
TILE16 = (2, 2, 4)          # one 16-token block


def _inputs(seed=0, b=2, f=3, h=10, w=14, n_txt=5):
    rng = np.random.default_rng(seed)
    return dict(hidden_states=rng.standard_normal((b, 16, f, h, w)).astype(np.float32),
                timestep=rng.uniform(0, 1000, b).astype(np.float32),
                encoder_hidden_states=rng.standard_normal((b, n_txt, 24)).astype(np.float32))


def _model(policies, tile=TILE16, seed=0):
    return Wan(TINY, rngs=nnx.Rngs(seed), dtype=jnp.float32, policies=policies, tile=tile)


def _pisa(density, dense_layers=0, **kw):
    return layer_policies(3, dense_layers=dense_layers, density=density, block_size=16, **kw)


def test_released_configs_split_the_head_dim_like_the_official_code():
    assert WAN_T2V_14B.head_dim == 128 and WAN_T2V_14B.rope_dims == (44, 42, 42)
    assert WAN_T2V_1_3B.head_dim == 128 and WAN_T2V_1_3B.num_layers == 30
    assert TINY.rope_dims == (8, 4, 4)
    with pytest.raises(ValueError, match=r"dim \(30\) must be a multiple of num_heads \(4\)"):
        WanConfig(dim=30, num_heads=4)
    with pytest.raises(NotImplementedError, match="image-to-video"):
        Wan(WanConfig(dim=32, num_heads=2, num_layers=1, ffn_dim=8, image_dim=1280),
            rngs=nnx.Rngs(0), policies=(pnn.DENSE,))


def test_default_policies_refuse_options_that_do_nothing():
    assert default_policies(TINY, "dense") == (pnn.DENSE,) * 3
    pisa = default_policies(TINY, "pisa", density=0.3, dense_layers=1)
    assert pisa[0] == pnn.DENSE and pisa[1].kind == "pisa" and pisa[2].density == 0.3
    with pytest.raises(ValueError, match=r"attention='dense' takes no PISA options .*"
                                         r"\['density', 'order'\]"):
        default_policies(TINY, "dense", density=0.3, order=0)
    with pytest.raises(ValueError, match="attention must be 'pisa' or 'dense'; got 'sparse'"):
        default_policies(TINY, "sparse")


def test_pisa_at_density_one_equals_dense_model_so_tokens_and_rope_are_restored():
    io = _inputs()                      # 3 x 5 x 7 token grid: partial 2x2x4 tiles
    dense = _model((pnn.DENSE,) * 3)(**io)
    full = _model(_pisa(1.0))(**io)
    assert full.shape == (2, 16, 3, 10, 14) and full.dtype == jnp.float32
    assert relative_error(full, dense) < 1e-5
    sparse = _model(_pisa(0.3))(**io)
    assert 1e-4 < relative_error(sparse, dense) < 1.0            # approximates, not equals


def test_policy_reaches_the_attention_calls_it_claims(monkeypatch):
    calls = []
    real_pisa, real_dense = pnn.piecewise_sparse_attention, pnn.dense_attention

    def spy_pisa(q, k, v, **kw):
        calls.append(("pisa", q.shape, k.shape, kw))
        return real_pisa(q, k, v, **kw)

    def spy_dense(q, k, v, **kw):
        calls.append(("dense", q.shape, k.shape, kw))
        return real_dense(q, k, v, **kw)

    monkeypatch.setattr(pnn, "piecewise_sparse_attention", spy_pisa)
    monkeypatch.setattr(pnn, "dense_attention", spy_dense)
    model = _model(_pisa(0.4, dense_layers=1, order=0))
    io = _inputs()
    model(**io)
    # Per block: self-attention (its policy), then cross-attention to 5 text tokens (dense).
    assert [c[0] for c in calls] == ["dense", "dense", "pisa", "dense", "pisa", "dense"]
    for kind, q, k, kw in calls:
        assert kw["layout"] == "bthd" and q == (2, 105, 2, 16)
        assert k[1] == (5 if k != q else 105)
        if kind == "pisa":
            assert kw["density"] == 0.4 and kw["order"] == 0 and kw["use_bias"] is True
            assert kw["block_size"] == 16 and kw["forced_blocks"] is None
    assert [c[2][1] for c in calls] == [105, 5] * 3
    calls.clear()
    model(**io, dense=True)
    assert [c[0] for c in calls] == ["dense"] * 6


def test_blocks_see_compact_tiles(monkeypatch):
    seen = []
    real = pnn.piecewise_sparse_attention
    monkeypatch.setattr(pnn, "piecewise_sparse_attention",
                        lambda q, k, v, **kw: seen.append(1) or real(q, k, v, **kw))
    model = _model(_pisa(0.5), tile=(2, 2, 4))
    order = model.token_order((3, 5, 7))
    coords = np.stack(np.unravel_index(order, (3, 5, 7)), -1)
    first = coords[:16]                                  # the first block: one 2x2x4 tile
    assert (first.max(0) - first.min(0) + 1).tolist() == [2, 2, 4]
    assert model.token_order((3, 5, 7), dense=True) is None
    model(**_inputs())
    assert len(seen) == 3
    with pytest.raises(ValueError, match=r"tile \(4, 4, 4\) holds 64 tokens; one block holds 16"):
        _model(_pisa(0.5), tile=(4, 4, 4))


def test_model_runs_under_jit():
    assert jit_error(_model(_pisa(0.5, dense_layers=1)), _inputs()) < 1e-5


def test_bad_model_inputs_are_named():
    model = _model((pnn.DENSE,) * 3)
    io = _inputs()
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[B, 16, F, H, W\]; "
                                         r"got \[2, 8, 3, 10, 14\]"):
        model(**(io | {"hidden_states": io["hidden_states"][:, :8]}))
    with pytest.raises(ValueError, match=r"multiples of the patch size \[1, 2, 2\]; got \[3, 9, 14\]"):
        model(**(io | {"hidden_states": io["hidden_states"][:, :, :, :9]}))
    with pytest.raises(ValueError, match=r"timestep must have shape \[2\]"):
        model(**(io | {"timestep": io["timestep"][:1]}))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \[2, L, 24\]"):
        model(**(io | {"encoder_hidden_states": io["encoder_hidden_states"][..., :20]}))
    with pytest.raises(ValueError, match="one entry per self-attention layer"):
        _model((pnn.DENSE,) * 2)


def test_schedule_is_shifted_towards_one():
    np.testing.assert_allclose(schedule(4, shift=1.0), [1, 0.75, 0.5, 0.25, 0])
    s = schedule(4, shift=3.0)
    np.testing.assert_allclose(s, [3 * x / (1 + 2 * x) for x in (1, 0.75, 0.5, 0.25, 0)],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1; got 0"):
        schedule(0)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1; got 2.5"):
        schedule(2.5)


def test_sampling_compiles_one_step_per_mode_and_guides(monkeypatch):
    traces = []
    real_call = Wan.__call__

    def counting_call(self, *a, **kw):
        traces.append(kw.get("dense"))
        return real_call(self, *a, **kw)

    monkeypatch.setattr(Wan, "__call__", counting_call)
    model = _model(_pisa(0.3))
    io = _inputs(seed=4, b=1, f=2, h=8, w=8)
    x, ctx = io["hidden_states"], io["encoder_hidden_states"]
    neg = np.random.default_rng(9).standard_normal(ctx.shape).astype(np.float32)
    sig = schedule(4, shift=3.0)
    steps = []
    out = denoise(model, x, ctx, sig, negative_context=neg, guidance_scale=4.0, dense_steps=1,
                  progress=lambda i, n: steps.append(i))
    assert steps == [1, 2, 3, 4] and out.shape == x.shape
    assert traces == [True, False]                      # one trace per attention mode
    denoise(model, x, ctx, sig, negative_context=neg, guidance_scale=2.0, dense_steps=1)
    assert traces == [True, False]                      # reused across calls and scales
    # The guided step by hand: v = v_u + g (v_c - v_u) from one batched 2B forward.
    monkeypatch.setattr(Wan, "__call__", real_call)
    one = denoise(model, x, ctx, sig[:2], negative_context=neg, guidance_scale=4.0)
    t = np.full((1,), 1000 * sig[0], np.float32)
    v_c, v_u = model(x, t, pad_text(ctx, 16)), model(x, t, pad_text(neg, 16))
    expected = x + (sig[1] - sig[0]) * (v_u + 4.0 * (v_c - v_u))
    assert relative_error(one, expected) < 1e-5


def test_denoise_pads_the_text_to_text_len_like_the_official_model():
    model = _model((pnn.DENSE,) * 3)
    io = _inputs(seed=5, b=1, f=2, h=4, w=4)
    x, ctx = io["hidden_states"], io["encoder_hidden_states"]            # 5 of 16 tokens
    by_hand = np.concatenate([ctx, np.zeros((1, 11, 24), np.float32)], axis=1)
    np.testing.assert_array_equal(pad_text(ctx, 16), by_hand)
    t = np.full((1,), 900.0, np.float32)
    # The padding is attended to: without it the model's output is another one.
    assert relative_error(model(x, t, ctx), model(x, t, by_hand)) > 1e-2
    sig = schedule(2, shift=3.0)
    neg = np.random.default_rng(2).standard_normal((1, 3, 24)).astype(np.float32)
    neg_by_hand = np.concatenate([neg, np.zeros((1, 13, 24), np.float32)], axis=1)
    for kw, kw_by_hand in (({}, {}), ({"negative_context": neg},
                                      {"negative_context": neg_by_hand})):
        short = denoise(model, x, ctx, sig, **kw)
        padded = denoise(model, x, by_hand, sig, **kw_by_hand)
        assert relative_error(short, padded) < 1e-6
    long = np.ones((1, 17, 24), np.float32)
    with pytest.raises(ValueError, match=r"context has 17 tokens; the model takes at most "
                                         r"text_len = 16"):
        denoise(model, x, long, sig)
    with pytest.raises(ValueError, match=r"negative_context has 17 tokens"):
        denoise(model, x, ctx, sig, negative_context=long)
    with pytest.raises(ValueError, match=r"context must have shape \[B, L, D\]; got \[5, 24\]"):
        pad_text(ctx[0], 16)
    with pytest.raises(ValueError, match="text_len"):
        WanConfig(text_len=0)


def test_denoise_refuses_text_batches_other_than_the_noise_batch():
    model = _model((pnn.DENSE,) * 3)
    io = _inputs(seed=6, b=1, f=2, h=4, w=4)
    x, ctx = io["hidden_states"], io["encoder_hidden_states"]
    two = np.concatenate([ctx, ctx])            # a CFG batch given as context: not guessed
    sig = schedule(1)
    with pytest.raises(ValueError, match=r"context must have shape \[1, L, text_dim\] \(one "
                                         r"entry per noise batch entry\); got \[2, 5, 24\]"):
        denoise(model, x, two, sig)
    with pytest.raises(ValueError, match=r"negative_context must have shape \[1, L, text_dim\]"):
        denoise(model, x, ctx, sig, negative_context=two)


def test_denoise_refuses_schedules_without_a_step_and_bad_dense_steps():
    model = _model((pnn.DENSE,) * 3)
    io = _inputs(seed=7, b=1, f=1, h=4, w=4)
    x, ctx = io["hidden_states"], io["encoder_hidden_states"]
    for sig, shape in ((schedule(1)[:1], r"\[1\]"), (np.ones((2, 2), np.float32), r"\[2, 2\]")):
        with pytest.raises(ValueError, match=r"sigmas must be 1D with at least 2 noise levels "
                                             r"\(one step\); got shape " + shape):
            denoise(model, x, ctx, sig)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"dense_steps must be an integer >= 0; got {bad}"):
            denoise(model, x, ctx, schedule(1), dense_steps=bad)


def test_float16_is_refused_and_precise_parameters_stay_float32():
    with pytest.raises(ValueError, match="dtype must be bfloat16 or float32 .*got float16"):
        Wan(TINY, rngs=nnx.Rngs(0), dtype=jnp.float16, policies=(pnn.DENSE,) * 3)
    model = Wan(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, policies=(pnn.DENSE,) * 3)
    block = model.blocks[1]
    precise = [block.modulation, model.head.modulation, block.norm3.weight, block.norm3.bias,
               block.self_attn.norm_q.weight, block.cross_attn.norm_k.weight,
               model.time_embedding["0"].kernel, model.time_embedding["2"].bias,
               model.time_projection["1"].kernel]
    assert all(p.dtype == jnp.float32 for p in precise)
    low = [block.self_attn.q.kernel, block.ffn["0"].kernel, model.text_embedding["0"].kernel,
           model.head.head.kernel, model.patch_embedding.kernel]
    assert all(p.dtype == jnp.bfloat16 for p in low)
    out = model(**_inputs(b=1, f=1, h=4, w=4))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


def test_benchmark_runs_at_toy_sizes(tmp_path, capsys):
    from benchmarks import wan as bench
    bench.main(["--tiny", "--reps", "1", "--no-diffusers", "--layers", "2", "--tiles",
                "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "expected at tiny (2 layers" in printed and "compiling our dense forward" in printed
    res = json.loads((tmp_path / "wan.json").read_text())
    r = res["shapes"]["tiny"]
    assert r["tokens"] == 3 * 6 * 8 and r["layers_built"] == 2 and r["layers_full"] == 5
    assert r["pisa_layers_built"] == 2 and r["dense_ms"] > 0 and r["pisa_ms"] > 0
    # Released setting from per-layer times: 4 dense blocks and 1 PISA block.
    assert r["dense_ms_extrapolated"] == pytest.approx(5 * r["dense_ms"] / 2)
    assert r["pisa_ms_extrapolated"] == pytest.approx((4 * r["dense_ms"] + r["pisa_ms"]) / 2)
    assert "pisa_speedup_over_dense" not in r            # only the extrapolated figure
    assert 0 < r["pisa_vs_dense_rel"] < 1 and r["attention_share_of_dense"] > 0
    errors = res["tile_errors"]["tiny 3x6x8"]
    assert set(errors) == {"length 3", "length 8", "length 1.5,4,4", "length 8,3,3"}
    assert all(set(row) == {"raster", "4x4x4", "2x8x4", "1x8x8"} for row in errors.values())
    assert all(0 < e < 1 for row in errors.values() for e in row.values())


def test_benchmark_plan_counts_flops_and_starts_nothing(tmp_path, capsys):
    from benchmarks import wan as bench
    cfg = WAN_T2V_14B
    # One 14B block at 720p, batch 2: 75,600 tokens; attention is 4 B T^2 dim FLOPs.
    one = bench.forward_flops(cfg, 2, 75_600, 512, layers=1)
    zero_attention = bench.forward_flops(cfg, 2, 75_600, 512, layers=1, pisa_layers=1)
    assert one - zero_attention == pytest.approx(0.85 * 4 * 2 * 75_600**2 * 5120)
    assert 3.0e14 < one < 3.5e14
    bench.main(["--plan", "--layers", "4", "--no-diffusers", "--out", str(tmp_path / "x")])
    printed = capsys.readouterr().out
    assert "expected at 14b-720p (4 layers" in printed and "expected total" in printed
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags", [["--all-tiles"], ["--tile-grid", "3,4,4"]])
def test_benchmark_refuses_tile_flags_without_tiles(flags, tmp_path, capsys):
    from benchmarks import wan as bench
    with pytest.raises(SystemExit):
        bench.main(["--plan", "--no-diffusers", "--out", str(tmp_path / "x"), *flags])
    assert "apply to the tile errors: add --tiles" in capsys.readouterr().err
