"""The FLUX.1 pipeline end to end against diffusers' FluxPipeline, its compile cache, the
multi-device path, its errors, the generate / compare commands and the image metrics.

Fixtures: tests/fixtures/make_pipeline_fixtures.py (tiny random dev and schnell pipeline
folders and diffusers' float32 outputs for fixed `latents`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from models.checkpoint import CheckpointError
from models.flux.generate import gaussian_window, psnr, ssim
from models.flux.pipeline import FluxPipeline, FluxPipelineOutput, SchedulerConfig
from models.flux.sampling import pack_latents, unpack_latents
from tests.helpers import relative_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder(variant):
    return os.path.join(FIXTURES, f"flux_pipeline_{variant}")


def reference(variant):
    d = np.load(os.path.join(FIXTURES, f"flux_pipeline_{variant}.npz"))
    kwargs = dict(height=int(d["height"]), width=int(d["width"]),
                  num_inference_steps=int(d["steps"]),
                  max_sequence_length=int(d["max_sequence_length"]), latents=d["latents"])
    if variant == "dev":
        kwargs["guidance_scale"] = float(d["guidance"])
    return [str(p) for p in d["prompts"]], kwargs, d


TWO_DEVICES = textwrap.dedent(f"""
    import jax, jax.numpy as jnp, numpy as np
    from models.flux.pipeline import FluxPipeline
    assert len(jax.devices()) == 2
    kw = dict(height=32, width=48, num_inference_steps=2, max_sequence_length=8,
              output_type="np", guidance_scale=2.0)
    prompts = ["a cat", "a red fox in the snow", "a boat"]
    one = FluxPipeline.from_pretrained({folder('dev')!r}, dtype=jnp.float32,
                                       devices=jax.devices()[:1])
    two = FluxPipeline.from_pretrained({folder('dev')!r}, dtype=jnp.float32)
    calls, steps, on_step = [], [], two._on_step
    two._on_step = lambda i: (calls.append(int(i)), on_step(i))   # before the trace
    a = one(prompts, seed=3, **kw).images
    b = two(prompts, seed=3, progress=steps.append, **kw).images      # 3 -> 4 images
    # Only the first device calls back, once per step; progress sees each step once.
    assert calls == [0, 1] and steps == [1, 2], (calls, steps)
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(two._states))
    assert a.shape == b.shape == (3, 32, 48, 3)
    print(float(np.abs(a - b).max()))
    assert np.abs(a - b).max() < 1e-5
    (t1, y1), (t2, y2) = one.encode_prompt(prompts, 8), two.encode_prompt(prompts, 8)
    assert t2.shape == (3, 8, t1.shape[2]) and y2.shape == y1.shape == (3, y1.shape[1])
    assert np.abs(np.asarray(t1) - np.asarray(t2)).max() < 1e-5
    assert np.abs(np.asarray(y1) - np.asarray(y2)).max() < 1e-5
    print("ok")
""")


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The two-device run (XLA_FLAGS must be set before jax starts) and the tiny benchmark,
    each in its own process, started first so that they overlap the other tests."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    two_env = env | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                  "--xla_backend_optimization_level=0"}   # faster compiles
    bench_out = tmp_path_factory.mktemp("bench") / "pipeline.json"
    bench = [sys.executable, os.path.join(ROOT, "benchmarks", "pipeline.py"), "--tiny",
             "--sizes", "64", "--out", str(bench_out)]
    procs = {"two_devices": subprocess.Popen([sys.executable, "-c", TWO_DEVICES], env=two_env,
                                             cwd=ROOT, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True),
             "benchmark": subprocess.Popen(bench, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)}
    yield procs, bench_out
    for proc in procs.values():
        proc.kill()


@pytest.fixture(scope="module")
def pipes(background):
    return {v: FluxPipeline.from_pretrained(folder(v), dtype=jnp.float32, attention="dense")
            for v in ("dev", "schnell")}


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_images_match_diffusers_flux_pipeline(pipes, variant):
    pipe = pipes[variant]
    prompts, kwargs, ref = reference(variant)
    assert pipe.is_dev == (variant == "dev")
    with open(os.path.join(folder(variant), "text_encoder", "config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2    # FLUX's legacy id: pooled at the largest
    np.testing.assert_array_equal(pipe.scheduler.sigmas(kwargs["num_inference_steps"],
                                                        kwargs["latents"].shape[1]),
                                  ref["sigmas"])
    txt, pooled = pipe.encode_prompt(prompts, kwargs["max_sequence_length"])
    assert relative_error(np.asarray(txt), ref["t5_embeds"]) < 1e-5
    assert relative_error(np.asarray(pooled), ref["pooled"]) < 1e-5
    latents = pipe(prompts, output_type="latent", **kwargs).images
    assert relative_error(latents, ref["final_latents"]) < 1e-4
    out = pipe(prompts, output_type="np", return_dict=False, **kwargs)
    assert isinstance(out, tuple) and len(out) == 1
    images = out[0]
    assert images.dtype == np.float32 and images.shape == ref["images"].shape
    assert ref["images"].std() > 0.1                    # a real image, not a flat one
    # max abs difference in [0, 1]: measured 6.3e-6 (dev), 1.7e-6 (schnell); issue bound 1e-3
    assert np.abs(images - ref["images"]).max() < 1e-4
    out = pipe(prompts, output_type="pil", **kwargs)
    assert isinstance(out, FluxPipelineOutput)
    pil = out.images
    assert len(pil) == len(prompts) and pil[0].size == (kwargs["width"], kwargs["height"])


def test_second_call_with_another_prompt_and_seed_neither_traces_nor_compiles(pipes):
    pipe = pipes["schnell"]
    steps = []
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                  output_type="np")
    first = pipe("a cat", seed=1, progress=steps.append, **kwargs).images
    assert steps == [1, 2]
    traces, compiled = dict(pipe.traces), len(pipe._compiled)
    second = pipe("a lighthouse by the sea", seed=2, **kwargs).images
    third = pipe("a lighthouse by the sea", seed=2, progress=steps.append, **kwargs).images
    assert dict(pipe.traces) == traces and len(pipe._compiled) == compiled
    assert pipe.last_timings["compile"] == 0.0
    assert np.abs(first - second).max() > 0.05         # prompt and seed matter
    np.testing.assert_array_equal(second, third)        # deterministic


def test_seed_i_of_a_batch_is_the_seed_plus_i_alone(pipes):
    pipe = pipes["schnell"]
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                  output_type="latent")
    batch = pipe(["a cat", "a dog"], seed=7, **kwargs).images
    np.testing.assert_allclose(batch[1], pipe("a dog", seed=8, **kwargs).images[0], atol=1e-5)
    np.testing.assert_allclose(batch, pipe(["a cat", "a dog"], seed=[7, 8], **kwargs).images,
                               atol=1e-6)


def test_pack_and_unpack_latents_are_inverse_and_diffusers_ordered():
    z = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)   # [B, h, w, C]
    packed = np.asarray(pack_latents(jnp.asarray(z)))
    assert packed.shape == (2, 6, 12)
    # token (0, 1) = 2x2 patch at rows 0-1, cols 2-3; features (channel, dy, dx)
    np.testing.assert_array_equal(packed[0, 1], z[0, 0:2, 2:4].transpose(2, 0, 1).ravel())
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(packed), 4, 6)), z)


def test_bad_arguments_raise_errors_naming_them(pipes):
    pipe = pipes["dev"]
    ok = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8)
    cases = [
        (dict(height=40), ValueError, "height must be a multiple of 16.*got 40"),
        (dict(width=0), ValueError, r"width must be >= 1; got 0"),
        (dict(num_inference_steps=0), ValueError, r"num_inference_steps must be >= 1; got 0"),
        (dict(dense_steps=3), ValueError, r"dense_steps must be in \[0, 2\]; got 3"),
        (dict(max_sequence_length=600), ValueError, r"max_sequence_length must be in \[1, 512\]"),
        (dict(output_type="jpg"), ValueError, "output_type must be one of"),
        (dict(latents=np.zeros((1, 5, 64))), ValueError, r"latents must have shape \[1, 4, 64\]"),
        (dict(seed=[1, 2]), ValueError, "one int per prompt"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(guidance_scale="high"), TypeError, "guidance_scale must be a real number"),
        (dict(guidance_scale=True), TypeError, "guidance_scale must be a real number"),
        (dict(guidance_scale=np.zeros(2)), TypeError, "guidance_scale must be a real number"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
        (dict(guidance_scale=-np.inf), ValueError, "guidance_scale must be finite"),
        (dict(progress=3), TypeError, "progress must be a callable"),
        (dict(return_dict="yes"), TypeError, "return_dict must be True or False"),
    ]
    for bad, err, msg in cases:
        with pytest.raises(err, match=msg):
            pipe("a cat", **(ok | bad))
    with pytest.raises(ValueError, match="empty list"):
        pipe([], **ok)
    with pytest.raises(TypeError, match="prompt must hold strings"):
        pipe(["a", 3], **ok)
    with pytest.warns(UserWarning, match="guidance_scale is ignored.*schnell"):
        pipes["schnell"]("a cat", guidance_scale=7.0, output_type="latent", **ok)


def test_a_second_guidance_neither_traces_nor_compiles_and_numpy_scalars_are_taken(pipes):
    pipe = pipes["dev"]
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                  output_type="latent", seed=5)
    first = pipe("a cat", guidance_scale=4.0, **kwargs).images
    traces, compiled = dict(pipe.traces), len(pipe._compiled)
    other = pipe("a cat", guidance_scale=1.5, **kwargs).images
    assert dict(pipe.traces) == traces and len(pipe._compiled) == compiled
    assert np.abs(first - other).max() > 1e-3            # the guidance reaches the model
    for g in (np.float32(4.0), np.array(4.0), np.int64(4), jnp.float32(4.0), 4):
        np.testing.assert_array_equal(pipe("a cat", guidance_scale=g, **kwargs).images, first)
    assert dict(pipe.traces) == traces and len(pipe._compiled) == compiled


def test_an_exception_in_the_progress_callback_is_raised_as_it_was(pipes):
    pipe = pipes["schnell"]
    kwargs = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=8,
                  output_type="latent")

    class Stop(Exception):
        pass
    seen = []

    def progress(done):
        seen.append(done)
        raise Stop(f"stop at {done}")
    with pytest.raises(Stop, match="stop at 1"):
        pipe("a cat", progress=progress, **kwargs)
    assert seen == [1]                        # not called again once it has raised
    done = []
    pipe("a cat", progress=done.append, **kwargs)    # the pipeline still works
    assert done == [1, 2]


def test_encode_prompt_takes_a_string_or_a_list_and_checks_them(pipes):
    pipe = pipes["dev"]
    txt, pooled = pipe.encode_prompt("a cat", 8)
    both, pooled2 = pipe.encode_prompt(["a cat", "a dog"], 8)
    assert txt.shape == (1, 8, both.shape[2]) and both.shape[0] == pooled2.shape[0] == 2
    np.testing.assert_allclose(np.asarray(both[:1]), np.asarray(txt), atol=1e-6)
    assert pipe.encode_prompt("a cat")[0].shape[1] == 512        # dev's default
    with pytest.raises(ValueError, match="empty list"):
        pipe.encode_prompt([], 8)
    with pytest.raises(ValueError, match=r"max_sequence_length must be in \[1, 512\]"):
        pipe.encode_prompt("a cat", 0)


def sigmas_from_the_published_formula(config: dict, steps: int, tokens: int) -> np.ndarray:
    """diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler, written from their
    documented formulas in float64: t_i = 1 - i/steps * (1 - 1/steps); dynamic: mu linear
    in the token count through (base_image_seq_len, base_shift) and (max_image_seq_len,
    max_shift), t -> e^mu / (e^mu + 1/t - 1); otherwise t -> shift t / (1 + (shift - 1) t).
    Keys missing from the config take the scheduler's defaults."""
    shift = config.get("shift", 1.0)
    t = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
    if config.get("use_dynamic_shifting", False):
        x0, x1 = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        y0, y1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = y0 + (tokens - x0) * (y1 - y0) / (x1 - x0)
        t = [math.exp(mu) / (math.exp(mu) + 1.0 / s - 1.0) for s in t]
    else:
        t = [shift * s / (1.0 + (shift - 1.0) * s) for s in t]
    return np.array(t + [0.0])


MINIMAL_SCHEDULERS = {   # as the released FLUX.1 folders ship them
    "schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0},
    "dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
            "shift": 3.0, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096},
    "constant shift 3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
}


@pytest.mark.parametrize("name", MINIMAL_SCHEDULERS)
def test_sigmas_of_minimal_scheduler_configs_follow_the_published_formula(name, tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(MINIMAL_SCHEDULERS[name]))
    sched = SchedulerConfig.from_diffusers(str(path))
    for steps, tokens in ((1, 4), (4, 256), (28, 1024), (50, 4096), (50, 16384)):
        want = sigmas_from_the_published_formula(MINIMAL_SCHEDULERS[name], steps, tokens)
        got = sched.sigmas(steps, tokens)
        assert got.dtype == np.float32 and got.shape == (steps + 1,)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    if name == "dev":      # the shift grows with the image: 4096 tokens bend more than 256
        assert (sched.sigmas(4, 4096)[1:-1] > sched.sigmas(4, 256)[1:-1]).all()


@pytest.mark.parametrize("weights, folder_of", [("schnell", "dev"), ("dev", "schnell")])
def test_a_scheduler_config_contradicting_the_weights_warns_and_is_replaced(weights,
                                                                             folder_of):
    with pytest.warns(UserWarning, match=f"use_dynamic_shifting={folder_of == 'dev'}.*"
                                         f"FLUX.1-{weights}'s schedule"):
        pipe = FluxPipeline.from_pretrained(
            folder(folder_of), dtype=jnp.float32, attention="dense",
            transformer=os.path.join(folder(weights), "transformer"))
    assert pipe.is_dev == (weights == "dev")
    assert pipe.scheduler == SchedulerConfig.for_variant(pipe.is_dev)
    want = sigmas_from_the_published_formula(MINIMAL_SCHEDULERS[weights], 4, 1024)
    np.testing.assert_allclose(pipe.scheduler.sigmas(4, 1024), want, rtol=2e-6)


def test_a_converted_transformer_replaces_the_folder_one(pipes, tmp_path):
    import jax
    from models.flux.convert import convert
    out = tmp_path / "flux-dev-converted"
    convert(os.path.join(folder("dev"), "transformer"), str(out), dtype=jnp.float32,
            progress=lambda *a: None)
    pipe = FluxPipeline.from_pretrained(folder("dev"), dtype=jnp.float32, attention="dense",
                                        transformer=str(out))
    assert pipe.is_dev and pipe.config == pipes["dev"].config
    for a, b in zip(jax.tree.leaves(pipe._states["transformer"]),
                    jax.tree.leaves(pipes["dev"]._states["transformer"])):
        np.testing.assert_array_equal(a, b)


def test_missing_component_and_truncated_weights_are_named(tmp_path):
    broken = tmp_path / "pipe"
    shutil.copytree(folder("schnell"), broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(CheckpointError, match="missing text_encoder_2 component: .*"
                                              "text_encoder_2 does not exist"):
        FluxPipeline.from_pretrained(str(broken), dtype=jnp.float32)
    shutil.copytree(os.path.join(folder("schnell"), "text_encoder_2"), broken / "text_encoder_2")
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        FluxPipeline.from_pretrained(str(broken), dtype=jnp.float32)
    with pytest.raises(CheckpointError, match="missing transformer component: .*nope"):
        FluxPipeline.from_pretrained(folder("schnell"), transformer="nope.safetensors")


def test_generate_command_writes_a_png_with_its_settings(tmp_path, capsys):
    from PIL import Image
    from models import cli
    out = tmp_path / "sub" / "fox.png"
    assert cli.main(["generate", "a red fox", "--model", folder("dev"), "--out", str(out),
                     "--height", "32", "--width", "48", "--steps", "2", "--seed", "4",
                     "--guidance", "2.5", "--dtype", "fp32", "--max-sequence-length", "8",
                     "--density", "0.5", "--dense-layers", "1", "--dense-steps", "1",
                     "--block-size", "128"]) == 0
    printed = capsys.readouterr().out
    assert "timings: load" in printed and "compile" in printed and "decoding" in printed
    image = Image.open(out)
    assert image.size == (48, 32)
    assert image.text["prompt"] == "a red fox" and image.text["seed"] == "4"
    assert image.text["steps"] == "2" and image.text["guidance"] == "2.5"
    assert image.text["attention"] == "pisa" and image.text["density"] == "0.5"
    assert image.text["dense_layers"] == "1" and image.text["block_size"] == "128"
    assert image.text["dense_steps"] == "1" and image.text["model"] == folder("dev")
    assert [p.name for p in out.parent.iterdir()] == ["fox.png"]     # no temp file left


def test_generate_checks_the_output_before_loading_anything(tmp_path, capsys):
    from models import cli
    (tmp_path / "file").write_text("")
    code = cli.main(["generate", "x", "--model", str(tmp_path / "no-model"),
                     "--out", str(tmp_path / "file" / "a.png")])
    assert code == 1 and "is not a folder we may write in" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--model", "m", "--out", str(tmp_path / "a.jpg")]) == 1
    assert "--out must end in .png" in capsys.readouterr().err


def test_commands_check_their_arguments_before_loading_anything(tmp_path, capsys):
    from models import cli
    base = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "a.png")]
    cases = [
        (["--steps", "0"], "--steps must be >= 1; got 0"),
        (["--steps", "2", "--dense-steps", "3"], r"--dense-steps must be >= 0 and <= --steps"),
        (["--dense-steps", "-1"], "--dense-steps must be >= 0; got -1"),
        (["--height", "40"], "--height must be a multiple of 16"),
        (["--width", "0"], "--width must be >= 1; got 0"),
        (["--max-sequence-length", "600"], r"--max-sequence-length must be in \[1, 512\]"),
        (["--guidance", "nan"], "--guidance must be finite"),
        (["--density", "1.5"], r"--density must be in \(0, 1\]; got 1.5"),
        (["--density", "nan"], r"--density must be in \(0, 1\]; got nan"),
        (["--density", "0"], r"--density must be in \(0, 1\]; got 0.0"),
        (["--dense-layers", "-1"], "--dense-layers must be >= 0; got -1"),
        (["--attention", "dense", "--density", "0.5"],
         "--density 0.5 would do nothing with --attention dense"),
        (["--attention", "dense", "--dense-layers", "2", "--density", "0.3"],
         "--density 0.3 and --dense-layers 2 would do nothing"),
        (["--attention", "dense", "--block-size", "128"],
         "--block-size 128 would do nothing with --attention dense"),
        (["--attention", "dense", "--dense-steps", "1"],
         "--dense-steps 1 would do nothing with --attention dense"),
        (["--seed", "-1"],
         r"--seed \(and --batch\): seeds must be in \[0, 2\*\*32\); got \[-1\]"),
        (["--seed", str(2**32 - 1), "--batch", "2"],          # only the seed out of range
         r"--seed \(and --batch\): seeds must be in .* got \[4294967296\]$"),
    ]
    import re
    for extra, msg in cases:
        assert cli.main(["generate", "x"] + base + extra) == 1, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search("error: " + msg, err), (extra, err)
    assert cli.main(["compare", "x"] + base + ["--steps", "0"]) == 1
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert cli.main(["compare", "x"] + base + ["--seeds", "0,-3"]) == 1
    assert "error: --seeds: seeds must be in [0, 2**32); got [-3]" in capsys.readouterr().err
    # Valid arguments get as far as loading, which names the missing folder.
    assert cli.main(["generate", "x"] + base + ["--steps", "1"]) == 1
    assert "no-model: no such folder" in capsys.readouterr().err


def test_out_of_memory_is_one_error_line(capsys):
    import argparse
    from jax.errors import JaxRuntimeError
    from models.flux.generate import _guarded

    def oom(args):
        raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                              "97.5GiB.\nmore XLA detail")
    args = argparse.Namespace(height=2048, width=2048, batch=8)
    assert _guarded(oom)(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of device memory")
    assert "2048x2048" in err and "batch of 8" in err and "smaller" in err
    assert "97.5GiB" in err

    def other(args):
        raise JaxRuntimeError("INTERNAL: something else")
    with pytest.raises(JaxRuntimeError, match="INTERNAL"):
        _guarded(other)(args)


def test_compare_command_writes_a_grid_and_prints_psnr_and_ssim(tmp_path, capsys):
    from PIL import Image
    from models import cli
    out = tmp_path / "grid.png"
    assert cli.main(["compare", "a cat", "a boat", "--model", folder("schnell"), "--out",
                     str(out), "--seeds", "0,1", "--height", "128", "--width", "128",
                     "--steps", "2", "--dtype", "fp32", "--max-sequence-length", "8",
                     "--density", "0.5", "--dense-layers", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("PSNR") == 5 and "mean" in printed and "SSIM" in printed
    # 72 tokens: two blocks of 64, one of them approximated, so PISA differs from dense.
    assert "inf dB" not in printed
    grid = Image.open(out)
    # dense | PISA | diff, 2 prompts x 2 seeds; a 14-pixel header and a caption per row
    assert grid.size == (3 * 128, 14 + 4 * (14 + 128))
    assert grid.text["seeds"] == "0,1" and grid.text["block_size"] == "64"


def test_labelled_grid_puts_each_row_under_its_caption_pixel_for_pixel():
    from models.flux.generate import labelled_grid
    rng = np.random.default_rng(3)
    rows = [rng.random((16, 3 * 20, 3)) for _ in range(2)]
    grid = np.asarray(labelled_grid(rows, ["first", "second"], ("a", "b", "c")))
    assert grid.shape == (14 + 2 * (14 + 16), 60, 3)
    for i, row in enumerate(rows):
        top = 14 + i * (14 + 16) + 14
        np.testing.assert_array_equal(grid[top:top + 16],
                                      (row * 255).round().astype(np.uint8))
        caption = grid[top - 14:top]
        assert (caption < 128).any() and (caption == 255).any()   # text on white


# ------------------------------------------------------------------- metrics

def test_ssim_is_one_for_identical_images_and_matches_hand_computed_cases():
    rng = np.random.default_rng(0)
    x = rng.random((20, 24, 3))
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, 1 - x) < 0                           # anti-correlated
    assert ssim(x, x * 0.5) < 1 and ssim(x, x * 0.5) == pytest.approx(ssim(x * 0.5, x))
    # Constant images: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    c1 = 0.01 ** 2
    a, b = 0.3, 0.7
    assert ssim(np.full((11, 11), a), np.full((11, 11), b)) == pytest.approx(
        (2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    # One 11x11 window: y = x + d gives equal variances and covariance = variance, so
    # SSIM is the luminance term of the Gaussian-weighted means.
    w = np.outer(gaussian_window(), gaussian_window())
    img = rng.random((11, 11))
    mx = (w * img).sum()
    assert ssim(img, img + 0.2) == pytest.approx(
        (2 * mx * (mx + 0.2) + c1) / (mx ** 2 + (mx + 0.2) ** 2 + c1), rel=1e-10)
    assert gaussian_window().sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="H, W >= 11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_psnr_of_a_known_error():
    x = np.zeros((4, 4, 3))
    assert psnr(x + 0.1, x) == pytest.approx(20.0)       # MSE 0.01 -> 20 dB
    assert psnr(x, x) == float("inf")


def test_benchmark_runs_tiny_on_the_cpu(background):
    procs, out_path = background
    out, err = procs["benchmark"].communicate(timeout=300)
    assert procs["benchmark"].returncode == 0, out + err
    import json
    result = json.loads(out_path.read_text())
    r = result["sizes"]["64"]
    for mode in ("dense", "pisa"):
        assert r[mode]["first_call_compile_s"] > 0 and r[mode]["second_call_compile_s"] == 0
        assert r[mode]["second_call_s"] > 0 and r[mode]["est_total_s_at_50"] > 0
    assert r["pisa_vs_dense_image_rel"] > 0          # PISA ran: the images differ
    assert {"t5", "clip", "vae_decode_64"} <= set(result["parts"])


def test_two_devices_give_the_images_of_one(background):
    proc = background[0]["two_devices"]
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "ok" in out, out + err


@pytest.mark.parametrize("module, argv, message", [
    ("pipeline", ["--sizes", "64,x"], "--sizes: expected comma-separated positive multiples "
                                      "of 16, got '64,x'"),
    ("pipeline", ["--sizes", "40"], "got '40'"),
    ("pipeline", ["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
    ("flux", ["--sizes", "1024,0"], "--sizes: expected comma-separated positive multiples "
                                    "of 16, got '1024,0'"),
])
def test_benchmark_flags_are_refused_before_any_work(module, argv, message, capsys):
    import importlib
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
