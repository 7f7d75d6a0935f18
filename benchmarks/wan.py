"""Wan2.1 transformer forward on random full-size weights: this project (dense, PISA)
against diffusers, the attention share of the forward, and (with --tiles) PISA's error
against dense per 3D tile shape.

    python benchmarks/wan.py [--shapes 14b-720p,1.3b-480p] [--layers N] [--reps 3]
        [--batch 2] [--no-diffusers] [--tiles [--all-tiles] [--tile-grid F,H,W]]
        [--plan] [--tiny] [--out DIR]

Per shape, most important first, `wan.json` rewritten after every measurement (a run cut
short keeps what it measured): our dense forward, our PISA forward (density 0.15, first 4
layers dense), dense and PISA attention alone at that shape (their time times the number of
layers over the dense forward is the attention share, the part PISA can speed up), then
diffusers' `WanTransformer3DModel` (PyTorch SDPA) if importable, its weights copied from
ours on the GPU through dlpack so both run the same weights. Batch 2 is one
classifier-free-guidance step. Random bf16 weights are drawn on the device.

`--layers N` builds the models with N blocks only (all PISA blocks in the PISA model) and
reports per-layer times and the full forward *extrapolated* to the released depth (the
work outside the blocks, about 1% at these shapes, is scaled with them). Before starting it
prints each stage's expected time from FLOP counts at 600 TFLOP/s (`--plan`: only that).
The tile errors (`--tiles`) are `benchmarks/wan_tiles.py`'s. `--tiny` runs everything at
toy sizes on the CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # share the GPU with torch

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import pisa_jax as pj  # noqa: E402
from models.checkpoint import flat_params  # noqa: E402
from models.wan import (WAN_T2V_1_3B, WAN_T2V_14B, Wan, WanConfig,  # noqa: E402
                        default_policies)
from models.wan.convert import diffusers_layout  # noqa: E402
from pisa_jax.metrics import relative_error as rel, time_per_call  # noqa: E402
from benchmarks import wan_tiles  # noqa: E402

N_TXT = 512
DENSITY = 0.15
TINY = WanConfig(dim=64, num_heads=2, num_layers=5, ffn_dim=128, text_dim=32, freq_dim=32)
# name -> (config, latent [F, H, W]); 81 frames -> 21 latent frames, 8x spatial VAE.
SHAPES = {"14b-720p": (WAN_T2V_14B, (21, 90, 160)), "1.3b-480p": (WAN_T2V_1_3B, (21, 60, 104)),
          "tiny": (TINY, (3, 12, 16))}
PEAK_FLOPS = 600e12                        # assumed bf16 rate of the stage estimates
# Compile seconds per block, dense / PISA, from the FLUX forward on the H200 (RESULTS.md).
COMPILE_S_PER_LAYER = (0.35, 0.55)
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


# ------------------------------------------------------------------- estimates

def attention_flops(batch: int, tokens: int, cfg: WanConfig, density: float = 1.0) -> float:
    """Self-attention FLOPs of one layer (QK^T and PV); PISA counts its exact path only."""
    return 4.0 * batch * tokens * tokens * cfg.dim * density


def forward_flops(cfg: WanConfig, batch: int, tokens: int, n_txt: int, *, layers: int,
                  pisa_layers: int = 0) -> float:
    """FLOPs of one forward with `layers` blocks, `pisa_layers` of them at DENSITY."""
    d = cfg.dim
    linear = 2 * batch * tokens * (6 * d * d + 2 * d * cfg.ffn_dim) + 4 * batch * n_txt * d * d
    cross = 4.0 * batch * tokens * n_txt * d
    outside = 2 * batch * (n_txt * (cfg.text_dim * d + d * d) + 2 * tokens * 64 * d)
    return (outside + layers * (linear + cross) + (layers - pisa_layers)
            * attention_flops(batch, tokens, cfg) + pisa_layers
            * attention_flops(batch, tokens, cfg, DENSITY))


def stage_estimates(name: str, layers: int | None, batch: int, reps: int,
                    use_diffusers: bool) -> dict:
    """Expected seconds per stage of one shape (compute at PEAK_FLOPS; compile: a guess)."""
    cfg, latent = SHAPES[name]
    tokens = int(np.prod([s // p for s, p in zip(latent, cfg.patch_size)]))
    n = layers or cfg.num_layers
    pisa = n if n < cfg.num_layers else max(0, n - 4)
    params = sum(math.prod(v.shape) for v in flat_params(abstract_model(
        dataclasses.replace(cfg, num_layers=n))).values())
    calls = 1 + reps
    est = {"weights (draw)": 2.0 + 2 * params / 1e12,
           "compile dense": 3 + COMPILE_S_PER_LAYER[0] * n,
           "dense forwards": calls * forward_flops(cfg, batch, tokens, N_TXT, layers=n)
           / PEAK_FLOPS,
           "compile PISA": 3 + COMPILE_S_PER_LAYER[1] * n,
           "PISA forwards": calls * forward_flops(cfg, batch, tokens, N_TXT, layers=n,
                                                  pisa_layers=pisa) / PEAK_FLOPS,
           "attention alone": 2 + (2 + reps) * attention_flops(batch, tokens, cfg,
                                                               1 + DENSITY) / PEAK_FLOPS}
    if use_diffusers:
        est["diffusers (build, copy, forwards)"] = 5.0 + est["dense forwards"] * 1.2
    return est


# ---------------------------------------------------------------------- forwards

def abstract_model(cfg: WanConfig, policies=None) -> Wan:
    return nnx.eval_shape(lambda: Wan(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                      policies=policies or default_policies(cfg, "dense")))


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "kind"))
def _draw(key, scale, *, shape, dtype, kind):
    if kind == "zeros":
        return jnp.zeros(shape, dtype)
    if kind == "ones":
        return jnp.ones(shape, dtype)
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(cfg: WanConfig, policies, seed: int = 0) -> Wan:
    """A bf16 `Wan` with random weights drawn on the default device, one small jitted draw
    per parameter shape: kernels N(0, 1/fan_in), modulation tables N(0, 1/dim), norm
    scales 1, biases 0 (as the model's own initialisers, without compiling them all)."""
    graphdef, state = nnx.split(abstract_model(cfg, policies))
    flat = dict(nnx.to_flat_state(state))
    key = jax.random.PRNGKey(seed)
    for i, (path, var) in enumerate(flat.items()):
        v = var.get_value() if hasattr(var, "get_value") else var.value
        leaf = str(path[-1])
        kind = ("zeros" if leaf == "bias" else "ones" if leaf == "weight" and v.ndim == 1
                else "normal")
        fan_in = v.shape[-1] if leaf == "modulation" else math.prod(v.shape[:-1])
        x = _draw(jax.random.fold_in(key, i), 1.0 / math.sqrt(max(fan_in, 1)),
                  shape=tuple(v.shape), dtype=v.dtype, kind=kind)
        flat[path] = var.replace(x)
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def inputs(cfg: WanConfig, latent, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_txt = 8 if cfg is TINY else N_TXT
    return dict(hidden_states=rng.standard_normal((batch, cfg.in_channels, *latent)),
                timestep=np.full((batch,), 700.0),
                encoder_hidden_states=rng.standard_normal((batch, n_txt, cfg.text_dim)))


def jax_median_ms(fn, *args, reps: int):
    """(median ms over `reps` synchronised calls after one warm call, the warm output).

    For the forwards, seconds per call at full size: their output is kept for the error
    against dense, and `time_per_call`'s second warm call and queued calls would add whole
    forwards without changing the median."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), out


def torch_median_ms(fn, reps: int, cuda: bool):
    import torch
    out = fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), out


def diffusers_ms(cfg: WanConfig, state, io, reps: int, r: dict):
    """diffusers' forward on the weights of our `state` (copied through dlpack on the
    device); its output (float32 numpy). Frees every torch allocation before returning."""
    import torch
    from diffusers import WanTransformer3DModel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log("diffusers: building the model on the device (bf16)")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            tmodel = WanTransformer3DModel(
                patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
                out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    log("diffusers: copying our weights into it (dlpack)")
    t0 = time.perf_counter()
    params = tmodel.state_dict()          # the names the converter maps
    ours = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    with torch.no_grad():
        for path, (name, axes) in diffusers_layout(cfg, params).items():
            x = ours[path]
            x = jax.block_until_ready(x.get_value() if hasattr(x, "get_value") else x.value)
            t = torch.from_dlpack(x)
            params[name].copy_(t if axes is None else t.permute(axes))
    r["diffusers_copy_s"] = time.perf_counter() - t0
    targs = {k: torch.from_numpy(np.asarray(v)).to(device, torch.bfloat16)
             for k, v in io.items()}

    @torch.no_grad()
    def run():
        return tmodel(**targs, return_dict=False)[0]

    log("diffusers: timing")
    try:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ms, out = torch_median_ms(run, r["reps"], device == "cuda")
        if device == "cuda":
            r["diffusers_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return ms, out.float().cpu().numpy()
    finally:
        del tmodel, targs, params, run
        if device == "cuda":
            torch.cuda.empty_cache()


def bench_shape(name: str, args, use_diffusers: bool, save) -> dict:
    """Measures one shape into `r` (saved after each measurement) and returns it."""
    cfg_full, latent = SHAPES[name]
    full = cfg_full.num_layers
    n = args.layers or full
    cfg = dataclasses.replace(cfg_full, num_layers=n)
    io = inputs(cfg, latent, args.batch)
    grid = tuple(s // p for s, p in zip(latent, cfg.patch_size))
    r = save.results["shapes"][name] = {
        "batch": args.batch, "latent": list(latent), "tokens": int(np.prod(grid)),
        "layers_built": n, "layers_full": full, "reps": args.reps}
    # A cut-down model has PISA in every block, to measure a PISA layer's time.
    policies = (default_policies(cfg, "pisa") if n == full
                else default_policies(cfg, "pisa", dense_layers=0))
    r["pisa_layers_built"] = sum(p.kind == "pisa" for p in policies)

    log(f"{name}: drawing random bf16 weights ({n} of {full} layers)")
    t0 = time.perf_counter()
    model = random_model(cfg, policies)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    r["weights_s"] = time.perf_counter() - t0
    r["weights_gib"] = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**30
    r["weights_gib_full"] = 2 * sum(math.prod(v.shape) for v in flat_params(
        abstract_model(cfg_full)).values()) / 2**30

    @functools.partial(jax.jit, static_argnames="dense")
    def forward(state, io, dense):
        return nnx.merge(graphdef, state)(io["hidden_states"], io["timestep"],
                                          io["encoder_hidden_states"], dense=dense)

    jio = {k: jnp.asarray(v, jnp.float32 if k == "timestep" else jnp.bfloat16)
           for k, v in io.items()}
    outs = {}
    for mode in ("dense", "pisa"):
        log(f"{name}: compiling our {mode} forward")
        t0 = time.perf_counter()
        compiled = forward.lower(state, jio, dense=mode == "dense").compile()
        r[f"{mode}_compile_s"] = time.perf_counter() - t0
        r[f"{mode}_temp_gib"] = compiled.memory_analysis().temp_size_in_bytes / 2**30
        log(f"{name}: timing our {mode} forward ({1 + args.reps} calls)")
        r[f"{mode}_ms"], out = jax_median_ms(compiled, state, jio, reps=args.reps)
        outs[mode] = np.asarray(out, np.float32)
        r[f"{mode}_ms_per_layer"] = r[f"{mode}_ms"] / n
        del compiled, out
        log(f"{name}: ours {mode} {r[f'{mode}_ms']:.1f} ms ({n} layers), compile "
            f"{r[f'{mode}_compile_s']:.1f} s")
        save()
    if n == full:
        r["pisa_speedup_over_dense"] = r["dense_ms"] / r["pisa_ms"]
    else:
        # Released setting: the first 4 blocks dense, the others PISA.
        r["dense_ms_extrapolated"] = r["dense_ms_per_layer"] * full
        r["pisa_ms_extrapolated"] = (min(4, full) * r["dense_ms_per_layer"]
                                     + (full - min(4, full)) * r["pisa_ms_per_layer"])
        r["pisa_speedup_over_dense_extrapolated"] = (r["dense_ms_extrapolated"]
                                                     / r["pisa_ms_extrapolated"])
    r["pisa_vs_dense_rel"] = rel(outs["pisa"], outs["dense"])
    stats = jax.devices()[0].memory_stats() or {}
    r["jax_peak_gib_so_far"] = stats.get("peak_bytes_in_use", 0) / 2**30
    r["peak_gib_full_estimated"] = r["weights_gib_full"] + max(r["dense_temp_gib"],
                                                               r["pisa_temp_gib"])
    save()

    # Attention alone at this shape, once per layer: the part PISA can speed up.
    log(f"{name}: timing dense and PISA attention alone")
    shape = (args.batch, r["tokens"], cfg.num_heads, cfg.head_dim)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16)
               for key in jax.random.split(jax.random.PRNGKey(1), 3))
    pisa = jax.jit(functools.partial(pj.piecewise_sparse_attention, density=DENSITY,
                                     use_bias=True))
    for mode, fn in (("dense", jax.jit(pj.dense_attention)), ("pisa", pisa)):
        r[f"attention_{mode}_ms_per_layer"] = 1e3 * time_per_call(fn, q, k, v, reps=args.reps)
    del q, k, v
    dense_full = r.get("dense_ms_extrapolated", r["dense_ms"])
    r["attention_share_of_dense"] = full * r["attention_dense_ms_per_layer"] / dense_full
    save()

    if use_diffusers:
        try:
            r["diffusers_ms"], ref = diffusers_ms(cfg, state, io, args.reps, r)
            r["dense_vs_diffusers_rel"] = rel(outs["dense"], ref)
            if n < full:
                r["diffusers_ms_extrapolated"] = r["diffusers_ms"] / n * full
            log(f"{name}: diffusers {r['diffusers_ms']:.1f} ms ({n} layers)")
        except Exception as e:         # keep our figures if torch runs out of memory
            r["diffusers_error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"{name}: diffusers failed: {r['diffusers_error']}")
        save()
    del state, model
    return r


def print_plan(shapes, args, use_diffusers: bool) -> float:
    total = 0.0
    for name in shapes:
        est = stage_estimates(name, args.layers, args.batch, args.reps, use_diffusers)
        total += sum(est.values())
        print(f"expected at {name} ({args.layers or SHAPES[name][0].num_layers} layers, "
              f"compute at {PEAK_FLOPS / 1e12:.0f} TFLOP/s, compile guessed): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in est.items()), flush=True)
    print(f"expected total (without start-up and --tiles): {total:.0f} s", flush=True)
    return total


def print_table(results: dict) -> None:
    print("\nfull forward (layers: released depth; 'from N': extrapolated from N built)")
    print(f"{'shape':>10} {'layers':>11} {'diffusers ms':>13} {'dense ms':>9} {'PISA ms':>8} "
          f"{'PISA/dense':>10} {'attn share':>10} {'peak GiB':>9}")
    for name, r in results["shapes"].items():
        if "pisa_ms" not in r:
            continue
        ext = "_extrapolated" if r["layers_built"] < r["layers_full"] else ""
        label = f"{r['layers_full']}" + (f" from {r['layers_built']}" if ext else "")
        print(f"{name:>10} {label:>11} "
              f"{r.get('diffusers_ms' + ext, float('nan')):13.1f} {r['dense_ms' + ext]:9.1f} "
              f"{r['pisa_ms' + ext]:8.1f} {r['pisa_speedup_over_dense' + ext]:9.2f}x "
              f"{r.get('attention_share_of_dense', float('nan')):10.2f} "
              f"{r['peak_gib_full_estimated']:9.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="14b-720p,1.3b-480p")
    p.add_argument("--layers", type=int, default=None,
                   help="build only N blocks; report per-layer times and the extrapolated "
                        "full forward (default: all blocks)")
    p.add_argument("--batch", type=int, default=2, help="2 = one CFG step (cond + uncond)")
    p.add_argument("--reps", type=int, default=3, help="timed calls after one warm call")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--no-diffusers", action="store_true", help="our forwards only")
    p.add_argument("--plan", action="store_true", help="print the expected stage times, stop")
    wan_tiles.add_arguments(p)
    p.add_argument("--tiny", action="store_true", help="toy sizes (CPU): a smoke run")
    args = p.parse_args(argv)
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {list(SHAPES)[:2]}")
    if args.batch < 1 or args.reps < 1:
        p.error(f"--batch and --reps must be positive; got {args.batch}, {args.reps}")
    max_layers = min(SHAPES[s][0].num_layers for s in shapes)
    if args.layers is not None and not 1 <= args.layers <= max_layers:
        p.error(f"--layers must lie in [1, {max_layers}]; got {args.layers}")
    grids = wan_tiles.grids(p, args, {s: tuple(n // q for n, q in zip(SHAPES[s][1],
                                                                      SHAPES[s][0].patch_size))
                                      for s in shapes})
    use_diffusers = False
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
            use_diffusers = True
        except ImportError:
            print("diffusers or torch not importable: our forwards only", flush=True)
    print_plan(shapes, args, use_diffusers)
    if args.plan:
        return
    os.makedirs(args.out, exist_ok=True)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "diffusers": use_diffusers, "shapes": {}, "tile_errors": {}}

    def save():
        with open(os.path.join(args.out, "wan.json"), "w") as f:
            json.dump(results, f, indent=1)
    save.results = results

    for name in shapes:
        bench_shape(name, args, use_diffusers, save)
    print_table(results)
    if args.tiles:
        wan_tiles.run(args, grids, results["tile_errors"], density=DENSITY, save=save, log=log)
    log("done")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
