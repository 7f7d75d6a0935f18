"""The Wan2.1 text-to-video pipeline end to end against diffusers' WanPipeline, its
schedule, compile cache, scheduler configs, errors, and the generate-video command.

Fixtures: tests/fixtures/make_wan_pipeline_fixtures.py (a tiny random diffusers Wan2.1
pipeline folder and diffusers' float32 outputs for fixed `latents`) and
tests/fixtures/make_wan_unipc.py (that folder with diffusers' UniPC scheduler).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from models.checkpoint import CheckpointError
from models.wan.pipeline import WanPipeline, WanPipelineOutput, clean_prompt
from models.wan.pipeline_loading import SchedulerConfig
from models.wan.unipc import UniPCConfig
from tests.helpers import relative_error

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(FIXTURES, "wan_pipeline")
REF = np.load(os.path.join(FIXTURES, "wan_pipeline.npz"))
UNIPC = np.load(os.path.join(FIXTURES, "wan_unipc.npz"))     # make_wan_unipc.py
CASES = ("batch", "single", "unguided")
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=2, max_sequence_length=8)
# The fixture's prompts are longer than their 16 tokens, as diffusers cuts them.
pytestmark = pytest.mark.filterwarnings("ignore:T5 tokenizer.*more than max_length")


def case(name):
    """(prompts, negative prompt as given to diffusers, call keywords) of a fixture case."""
    get = lambda k: REF[f"{name}_{k}"]
    prompts = [str(p) for p in get("prompts")]
    negative = [str(p) for p in get("negative")] or None
    if negative is not None and name != "batch":
        negative = negative[0]                    # given as a string
    kwargs = dict(height=int(get("height")), width=int(get("width")),
                  num_frames=int(get("frames")), num_inference_steps=int(get("steps")),
                  guidance_scale=float(get("guidance")),
                  max_sequence_length=int(get("max_sequence_length")), latents=get("latents"))
    return prompts, negative, kwargs


TWO_DEVICES = textwrap.dedent(f"""
    import jax, jax.numpy as jnp, numpy as np
    from models.wan.pipeline import WanPipeline
    assert len(jax.devices()) == 2
    kw = dict(height=32, width=48, num_frames=5, num_inference_steps=2,
              max_sequence_length=8)
    prompts = ["a cat", "a red fox in the snow", "a boat"]
    one = WanPipeline.from_pretrained({FOLDER!r}, dtype=jnp.float32, attention="dense",
                                      devices=jax.devices()[:1])
    two = WanPipeline.from_pretrained({FOLDER!r}, dtype=jnp.float32, attention="dense")
    steps = []
    a = one(prompts, ["", "blurry", "dark"], seed=3, **kw).frames
    b = two(prompts, ["", "blurry", "dark"], seed=3, progress=steps.append, **kw).frames
    assert steps == [1, 2], steps                   # once per step, from one device
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(two._states))
    assert a.shape == b.shape == (3, 5, 32, 48, 3)
    assert np.abs(a - b).max() < 1e-5, np.abs(a - b).max()
    print("ok")
""")


@pytest.fixture(scope="module")
def two_devices():
    """The two-device run in its own process (XLA_FLAGS must be set before jax starts),
    started first so that it overlaps the other tests."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=2 "
                         "--xla_backend_optimization_level=0")   # faster compiles
    proc = subprocess.Popen([sys.executable, "-c", TWO_DEVICES], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def pipe(two_devices):
    return WanPipeline.from_pretrained(FOLDER, dtype=jnp.float32, attention="dense")


@pytest.mark.parametrize("name", CASES)
def test_videos_match_diffusers_wan_pipeline(pipe, name):
    prompts, negative, kwargs = case(name)
    get = lambda k: REF[f"{name}_{k}"]
    guided = kwargs["guidance_scale"] > 1
    ids = pipe.tokenizer([clean_prompt(p) for p in prompts], kwargs["max_sequence_length"])
    np.testing.assert_array_equal(ids, get("ids"))
    txt, neg = pipe.encode_prompt(prompts, negative, do_classifier_free_guidance=guided,
                                  max_sequence_length=kwargs["max_sequence_length"])
    assert relative_error(np.asarray(txt), get("prompt_embeds")) < 1e-5
    # Zero past each prompt's tokens, as diffusers re-pads them.
    assert (np.asarray(txt)[ids == pipe.tokenizer.pad_id] == 0).all()
    if guided:
        assert relative_error(np.asarray(neg), get("negative_embeds")) < 1e-5
    else:
        assert neg is None
    latents = pipe(prompts, negative, output_type="latent", **kwargs).frames
    assert latents.shape == kwargs["latents"].shape
    assert relative_error(latents, get("final_latents")) < 1e-5      # measured <= 1e-6
    out = pipe(prompts, negative, return_dict=False, **kwargs)
    assert isinstance(out, tuple) and len(out) == 1
    videos, ref = out[0], get("videos")
    assert videos.dtype == np.float32 and videos.shape == ref.shape
    assert ref.std() > 0.1 and ((ref > 0.01) & (ref < 0.99)).mean() > 0.5   # not saturated
    # max abs difference in [0, 1]: measured 9.0e-6 (batch), 3.0e-6, 3.6e-6; target 1e-3
    assert np.abs(videos - ref).max() < 1e-4


def test_pil_output_is_a_list_of_frames_per_video(pipe):
    prompts, negative, kwargs = case("batch")
    out = pipe(prompts, negative, output_type="pil", **kwargs)
    assert isinstance(out, WanPipelineOutput) and len(out.frames) == 2
    assert len(out.frames[1]) == 5 and out.frames[1][0].size == (48, 32)
    want = (REF["batch_videos"][1, 4] * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(out.frames[1][4]).astype(int) - want).max() <= 1


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_sigmas_and_timesteps_are_diffusers_flow_match_euler(shift):
    for steps in (1, 2, 3, 10, 50):
        sigmas = SchedulerConfig(shift).sigmas(steps)
        assert sigmas.dtype == np.float32
        np.testing.assert_array_equal(sigmas, REF[f"sigmas_{shift}_{steps}"])
        np.testing.assert_array_equal(np.float32(1000) * sigmas[:-1],
                                      REF[f"timesteps_{shift}_{steps}"])


def test_second_call_with_another_prompt_and_seed_neither_traces_nor_compiles(pipe):
    steps = []
    first = pipe("a cat", seed=1, progress=steps.append, **SMALL).frames
    assert steps == [1, 2]
    traces, compiled = dict(pipe.traces), len(pipe._compiled)
    second = pipe("a lighthouse by the sea", "blurry", seed=2, guidance_scale=3.0,
                  **SMALL).frames
    third = pipe("a lighthouse by the sea", "blurry", seed=2, guidance_scale=3.0,
                 progress=steps.append, **SMALL).frames
    assert dict(pipe.traces) == traces and len(pipe._compiled) == compiled
    assert pipe.last_timings["compile"] == 0.0
    assert set(pipe.last_timings) == {"compile", "text_encoding", "denoising", "decoding"}
    assert np.abs(first - second).max() > 0.05          # prompt and seed matter
    np.testing.assert_array_equal(second, third)        # deterministic
    assert steps == [1, 2, 1, 2]


def test_seed_i_of_a_batch_is_the_seed_plus_i_alone(pipe):
    kwargs = SMALL | dict(output_type="latent")
    batch = pipe(["a cat", "a dog"], seed=7, **kwargs).frames
    np.testing.assert_allclose(batch[1], pipe("a dog", seed=8, **kwargs).frames[0], atol=1e-5)
    np.testing.assert_allclose(batch, pipe(["a cat", "a dog"], seed=[7, 8], **kwargs).frames,
                               atol=1e-6)


def test_the_negative_prompt_defaults_to_empty_and_reaches_the_model(pipe):
    kwargs = SMALL | dict(output_type="latent", seed=3)
    default = pipe("a cat", **kwargs).frames
    np.testing.assert_array_equal(pipe("a cat", "", **kwargs).frames, default)
    assert np.abs(pipe("a cat", "a dog", **kwargs).frames - default).max() > 1e-3
    # Without guidance (scale <= 1) the negative prompt is not used.
    unguided = kwargs | dict(guidance_scale=1.0)
    np.testing.assert_array_equal(pipe("a cat", "a dog", **unguided).frames,
                                  pipe("a cat", **unguided).frames)


def test_prompts_are_cleaned_as_diffusers_cleans_them():
    assert clean_prompt("  a  cat\n\t&amp;amp;\u3000dog\u00a0 ") == "a cat & dog"
    assert clean_prompt("x\x1cy") == "x\x1cy"       # not whitespace for diffusers' regex
    assert clean_prompt("&lt;b&gt;") == "<b>"


def test_bad_arguments_raise_errors_naming_them(pipe):
    cases = [
        (dict(num_frames=6), ValueError, r"num_frames must be 1 \+ 4k .* e.g. 5 or 9; got 6"),
        (dict(num_frames=0), ValueError, r"num_frames must be >= 1; got 0"),
        (dict(height=40), ValueError, "height must be a multiple of 16.*got 40"),
        (dict(width=8), ValueError, "width must be a multiple of 16.*got 8"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps must be >= 1; got 0"),
        (dict(dense_steps=3), ValueError, r"dense_steps must be in \[0, 2\]; got 3"),
        (dict(max_sequence_length=513), ValueError, r"max_sequence_length must be in \[1, 512\]"),
        (dict(output_type="pt"), ValueError, "output_type must be one of"),
        (dict(latents=np.zeros((1, 16, 2, 4, 4))), ValueError,
         r"latents must have shape \[1, 16, 2, 4, 6\]"),
        (dict(seed=[1, 2]), ValueError, "one int per prompt"),
        (dict(guidance_scale="high"), TypeError, "guidance_scale must be a real number"),
        (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be finite"),
        (dict(negative_prompt=["a", "b"]), ValueError, r"one string per prompt \(1\); got 2"),
        (dict(negative_prompt=3), TypeError, "negative_prompt must be None, a string"),
        (dict(progress=3), TypeError, "progress must be a callable"),
        (dict(return_dict="yes"), TypeError, "return_dict must be True or False"),
    ]
    for bad, err, msg in cases:
        with pytest.raises(err, match=msg):
            pipe("a cat", **(SMALL | bad))
    with pytest.raises(ValueError, match="empty list"):
        pipe([], **SMALL)
    with pytest.raises(TypeError, match="prompt must hold strings"):
        pipe(["a", 3], **SMALL)


def _copy_with_scheduler(tmp_path, config: dict | None) -> str:
    out = tmp_path / "pipe"
    shutil.copytree(FOLDER, out)
    if config is None:
        shutil.rmtree(out / "scheduler")
    else:
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return str(out)


def test_a_unipc_folder_loads_without_warning_and_matches_diffusers_with_unipc(pipe,
                                                                               tmp_path):
    def config(name):
        return json.loads(str(UNIPC[f"pipe_{name}_config"]))   # as diffusers writes it
    path = _copy_with_scheduler(tmp_path, config("guided"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unipc = WanPipeline.from_pretrained(path, dtype=jnp.float32, attention="dense")
    assert unipc.scheduler == SchedulerConfig(3.0, "UniPCMultistepScheduler", UniPCConfig())
    assert unipc.scheduler.solver == "unipc"
    kw = dict(height=32, width=48, num_frames=5, max_sequence_length=8, output_type="latent")
    guided = dict(num_inference_steps=4, guidance_scale=5.0,
                  latents=UNIPC["pipe_guided_latents"], **kw)
    prompts = ["a red fox running in the snow", "an old lighthouse"]
    steps = []
    out = unipc(prompts, progress=steps.append, **guided).frames
    assert steps == [1, 2, 3, 4]
    ref = UNIPC["pipe_guided_final"]
    # float32 on both sides, the bound of the Euler parity test above: measured 4.6e-7
    # (4 guided steps) and 2.8e-7 (6 unguided steps); Euler with the same shift is 0.36 off.
    assert relative_error(out, ref) < 1e-5
    assert relative_error(pipe(prompts, **guided).frames, ref) > 1e-1
    traces, compiled = dict(unipc.traces), len(unipc._compiled)
    np.testing.assert_array_equal(unipc(prompts, **guided).frames, out)
    assert dict(unipc.traces) == traces and len(unipc._compiled) == compiled
    # Another folder's flow_shift: an input of the same compiled loop.
    other = tmp_path / "unguided.json"
    other.write_text(json.dumps(config("unguided")))
    unipc.scheduler = SchedulerConfig.from_diffusers(str(other))
    assert unipc.scheduler.shift == 5.0
    unguided = dict(num_inference_steps=6, guidance_scale=1.0,
                    latents=UNIPC["pipe_unguided_latents"], **kw)
    out = unipc("a small boat on a calm lake", **unguided).frames
    assert relative_error(out, UNIPC["pipe_unguided_final"]) < 1e-5


@pytest.mark.parametrize("config, message", [
    ({"_class_name": "DDIMScheduler"}, "scheduler 'DDIMScheduler' is not supported"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True},
     r"only a constant shift .* sets \['use_dynamic_shifting'\]"),
    ({"_class_name": "UniPCMultistepScheduler", "prediction_type": "epsilon"},
     "without flow sigmas"),
    ({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction"},
     "without flow sigmas.*got use_flow_sigmas=None"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 0},
     r"scheduler_config.json: shift must be a finite positive number; got 0$"),
] + [({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
       "prediction_type": "flow_prediction", "flow_shift": value},
      rf"scheduler_config.json: flow_shift must be a finite positive number; got {text}$")
     for value, text in ((-1.0, "-1.0"), (None, "None"), ("3", "'3'"), (float("inf"), "inf"))
] + [({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
       "prediction_type": "flow_prediction", key: value},
      rf"settings not implemented: {key}={re.escape(repr(value))} \(implemented: ")
     for key, value in (("solver_order", 4), ("predict_x0", False), ("solver_type", "bh1"),
                        ("thresholding", True), ("use_karras_sigmas", True),
                        ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
                        ("final_sigmas_type", "sigma_min"), ("use_dynamic_shifting", True),
                        ("shift_terminal", 0.1), ("lower_order_final", False),
                        ("disable_corrector", [1.5]), ("num_train_timesteps", 500))])
def test_unsupported_scheduler_configs_are_refused_before_loading(tmp_path, config, message):
    path = _copy_with_scheduler(tmp_path, config)
    os.remove(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=message):      # not the missing weights
        WanPipeline.from_pretrained(path, dtype=jnp.float32)


def test_no_scheduler_folder_means_shift_3(tmp_path):
    path = _copy_with_scheduler(tmp_path, None)
    pipe = WanPipeline.from_pretrained(path, dtype=jnp.float32, attention="dense")
    assert pipe.scheduler == SchedulerConfig(3.0)


def test_missing_component_is_named(tmp_path):
    path = _copy_with_scheduler(tmp_path, {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    shutil.rmtree(os.path.join(path, "text_encoder"))
    with pytest.raises(CheckpointError, match="missing text_encoder component: .*text_encoder "
                                              "does not exist"):
        WanPipeline.from_pretrained(path, dtype=jnp.float32)


def test_pisa_at_density_one_equals_dense(pipe):
    sparse = WanPipeline.from_pretrained(FOLDER, dtype=jnp.float32, attention="pisa",
                                         density=1.0, dense_layers=0)
    assert sparse.has_pisa
    prompts, negative, kwargs = case("batch")
    a = sparse(prompts, negative, output_type="latent", **kwargs).frames
    assert relative_error(a, REF["batch_final_latents"]) < 1e-5


# ------------------------------------------------------------------ command line

def test_generate_video_writes_a_webp_and_frames(pipe, tmp_path, capsys):
    from PIL import Image
    from models import cli
    out, frames = tmp_path / "sub" / "fox.webp", tmp_path / "frames"
    assert cli.main(["generate-video", "a red fox", "--model", FOLDER, "--out", str(out),
                     "--height", "32", "--width", "48", "--frames", "5", "--steps", "2",
                     "--seed", "4", "--guidance", "3.0", "--dtype", "fp32", "--fps", "8",
                     "--max-sequence-length", "8", "--negative-prompt", "blurry",
                     "--frames-dir", str(frames), "--attention", "dense"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"timings: load .* compile .* text encoding .* denoising .* s/step\), "
                     r"decoding", printed)
    video = Image.open(out)
    assert video.format == "WEBP" and video.n_frames == 5 and video.size == (48, 32)
    video.seek(1)
    video.load()
    assert video.info["duration"] == 125                              # 8 fps
    assert [p.name for p in out.parent.iterdir()] == ["fox.webp"]     # no temp file left
    names = sorted(p.name for p in frames.iterdir())
    assert names == [f"frame-{i:05d}.png" for i in range(5)]
    png = Image.open(frames / "frame-00003.png")
    assert png.size == (48, 32) and png.text["seed"] == "4" and png.text["frame"] == "3"
    assert png.text["prompt"] == "a red fox" and png.text["negative_prompt"] == "blurry"
    # The PNG frames are the pipeline's exactly (the WebP is lossy).
    want = pipe("a red fox", "blurry", height=32, width=48, num_frames=5,
                num_inference_steps=2, guidance_scale=3.0, seed=4,
                max_sequence_length=8).frames[0, 3]
    np.testing.assert_array_equal(np.asarray(png), (want * 255).round().astype(np.uint8))


def test_generate_video_checks_its_arguments_before_loading_anything(tmp_path, capsys):
    from models import cli
    (tmp_path / "file").write_text("")
    base = ["generate-video", "x", "--model", str(tmp_path / "no-model")]
    out = ["--out", str(tmp_path / "a.webp")]
    cases = [
        (["--out", str(tmp_path / "a.gif")], "--out must end in .webp"),
        (["--out", str(tmp_path / "file" / "a.webp")], "is not a folder we may write in"),
        (out + ["--frames-dir", str(tmp_path / "file")], "is not a folder we may write in"),
        (out + ["--frames", "80"], r"--frames must be 1 \+ 4k \(e.g. 81\); got 80"),
        (out + ["--fps", "0"], "--fps must be a positive number; got 0"),
        (out + ["--height", "40"], "--height must be a multiple of 16"),
        (out + ["--steps", "0"], "--steps must be >= 1; got 0"),
        (out + ["--steps", "2", "--dense-steps", "3"], "--dense-steps must be >= 0 and <= "),
        (out + ["--max-sequence-length", "600"], r"--max-sequence-length must be in \[1, 512\]"),
        (out + ["--guidance", "nan"], "--guidance must be finite"),
        (out + ["--attention", "dense", "--density", "0.5"],
         "--density 0.5 would do nothing with --attention dense"),
        (out + ["--seed", "-1"], r"seeds must be in \[0, 2\*\*32\)"),
        (out + ["--batch", "0"], "--batch must be >= 1; got 0"),
    ]
    for extra, msg in cases:
        assert cli.main(base + extra) == 1, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search("^error: .*" + msg, err), (extra, err)
    # Valid arguments get as far as loading, which names the missing folder.
    assert cli.main(base + out + ["--steps", "1"]) == 1
    assert "no-model: no such folder" in capsys.readouterr().err


def test_two_devices_give_the_videos_of_one(two_devices):
    out, err = two_devices.communicate(timeout=300)
    assert two_devices.returncode == 0 and "ok" in out, out + err
