"""Full-size FLUX.1-dev transformer forward: this project (dense, PISA) against diffusers.

    python benchmarks/flux.py [--sizes 1024,2048] [--out benchmarks/out] [--no-diffusers]
        [--implementations auto,triton,mosaic] [--block-size 64|128] [--profile]

Random bf16 weights are drawn once on the GPU in diffusers' `FluxTransformer2DModel`
(PyTorch, SDPA attention) and copied into the Flax model through the converter's
diffusers mapping, so both run the same weights. Per image size it reports one forward's
median time (our modes take turns), `jax.jit` compile time, device memory, and the
relative difference of our dense bf16 output to diffusers'. With --profile it also
reports each forward's GPU time by kernel group (cuDNN attention, the PISA kernels, the
rest) from a profiler trace. PISA runs once per kernel backend in --implementations
(default "auto"; the first one fills the `pisa_*` keys, each one `pisa_<name>_*`). Writes
`flux.json` to --out and a table to stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # share the GPU with torch

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.profile_op import kernel_times  # noqa: E402
from models.flux import FLUX_DEV, default_policies  # noqa: E402
from models.flux.convert import iter_diffusers_state, model_from_tensors  # noqa: E402
from pisa_jax.cli import comma_list  # noqa: E402
from pisa_jax.nn import Attention  # noqa: E402
from pisa_jax.metrics import relative_error as rel  # noqa: E402

N_TXT = 512


def inputs(size: int, seed: int = 0):
    side = size // 16                       # 8x VAE downsampling, then 2x2 patches
    rng = np.random.default_rng(seed)
    rr, cc = np.divmod(np.arange(side * side), side)
    img_ids = np.stack([np.zeros_like(rr), rr, cc], -1).astype(np.float32)
    return dict(img=rng.standard_normal((1, side * side, 64)).astype(np.float32),
                img_ids=img_ids[None], txt=rng.standard_normal((1, N_TXT, 4096)).astype(np.float32),
                txt_ids=np.zeros((1, N_TXT, 3), np.float32),
                timesteps=np.array([0.6], np.float32), y=rng.standard_normal((1, 768)).astype(
                    np.float32), guidance=np.array([3.5], np.float32))


def torch_median_ms(fn, reps=5):
    import torch
    fn(), fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def diffusers_model():
    import torch
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(guidance_embeds=True).eval()
    torch.set_default_dtype(torch.float32)
    return model


def diffusers_inputs(io):
    import torch
    t = lambda x: torch.from_numpy(x).cuda().to(torch.bfloat16)
    return dict(hidden_states=t(io["img"]), encoder_hidden_states=t(io["txt"]),
                pooled_projections=t(io["y"]), timestep=t(io["timesteps"]),
                img_ids=t(io["img_ids"][0]), txt_ids=t(io["txt_ids"][0]),
                guidance=t(io["guidance"]))


def diffusers_forward(model, io):
    import torch
    args = diffusers_inputs(io)

    @torch.no_grad()
    def run():
        return model(**args).sample
    return run


def kernel_group(name: str) -> str:
    """Which part of the forward a GPU kernel belongs to, from its name."""
    for key, group in (("pisa_block_statistics", "PISA statistics"), ("pisa_top_k", "PISA top-k"),
                       ("pisa_piecewise_attention", "PISA attention"),
                       ("mosaic_gpu_kernel", "PISA attention"),   # Mosaic's name in traces
                       ("fmha", "cuDNN attention"),
                       ("sdpa", "cuDNN attention"), ("flash", "cuDNN attention"),
                       ("cudnn", "cuDNN attention")):
        if key in name.lower():
            return group
    return "other"


def gpu_profile(fn, args, calls: int = 2) -> dict:
    """GPU milliseconds per forward by kernel group, and the ten longest other kernels."""
    times, span = kernel_times(fn, args, calls)
    groups: dict = {}
    for name, us in times.items():
        groups[kernel_group(name)] = groups.get(kernel_group(name), 0.0) + us / 1e3
    top = sorted(((us, n) for n, us in times.items() if kernel_group(n) == "other"), reverse=True)
    print("   GPU ms per forward:", {g: round(ms, 2) for g, ms in sorted(groups.items())},
          f"total {sum(groups.values()):.2f}, span {span / 1e3:.2f}", flush=True)
    return dict(groups=groups, total=sum(groups.values()), span=span / 1e3,
                top_other_us={n[:90]: us for us, n in top[:10]})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=(1024, 2048),
                   type=comma_list(int, "comma-separated positive multiples of 16",
                                   lambda s: s > 0 and s % 16 == 0),
                   help="image sides in pixels (default 1024,2048)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--no-diffusers", action="store_true",
                   help="do not time diffusers (its model still draws the shared random "
                        "weights, so torch and diffusers are still needed)")
    p.add_argument("--f32-reference", action="store_true",
                   help="also run diffusers in float32 (same weights) at the first size, to "
                        "measure how far each bf16 forward is from it")
    p.add_argument("--implementations", default=("auto",),
                   type=comma_list(str, "comma-separated backends: auto, triton, mosaic",
                                   lambda s: s in ("auto", "triton", "mosaic")),
                   help="kernel backends of the PISA layers to time (default auto)")
    p.add_argument("--block-size", type=int, choices=(64, 128), default=64,
                   help="PISA block size of the sparse layers (default 64, the published one)")
    p.add_argument("--profile", action="store_true",
                   help="also trace two forwards per mode and report GPU time per kernel "
                        "group (cuDNN attention, each PISA kernel, everything else)")
    args = p.parse_args(argv)
    sizes = list(args.sizes)
    os.makedirs(args.out, exist_ok=True)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "block_size": args.block_size, "sizes": {}}

    def save():
        with open(os.path.join(args.out, "flux.json"), "w") as f:
            json.dump(results, f, indent=1)

    import torch
    tmodel = diffusers_model()
    ref_out, f32_out = {}, None
    for size in sizes:
        io = inputs(size)
        r = results["sizes"].setdefault(str(size), {"tokens": io["img"].shape[1] + N_TXT})
        if not args.no_diffusers:
            run = diffusers_forward(tmodel, io)
            torch.cuda.reset_peak_memory_stats()
            r["diffusers_ms"] = torch_median_ms(run)
            r["diffusers_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            ref_out[size] = run().float().cpu().numpy()
            print(f"{size}: diffusers {r['diffusers_ms']:.1f} ms", flush=True)
            if args.f32_reference and size == sizes[0]:
                try:
                    f32_model = copy.deepcopy(tmodel).float()
                    with torch.no_grad():
                        out32 = f32_model(**{k: (v.float() if v.is_floating_point() else v)
                                             for k, v in diffusers_inputs(io).items()}).sample
                    f32_out = out32.cpu().numpy()
                    del f32_model, out32
                    torch.cuda.empty_cache()
                    r["diffusers_bf16_vs_f32_rel"] = rel(ref_out[size], f32_out)
                    print(f"{size}: diffusers bf16 vs f32: {r['diffusers_bf16_vs_f32_rel']:.4f}")
                except Exception as e:  # keep the timings even if this extra fails
                    print(f"float32 reference failed: {type(e).__name__}: {e}")
    save()

    t0 = time.perf_counter()
    to_array = lambda x: jnp.array(jax.dlpack.from_dlpack(x.detach().contiguous()), copy=True)
    model = model_from_tensors(FLUX_DEV, iter_diffusers_state(
        tmodel.state_dict(), FLUX_DEV, dtype=jnp.bfloat16, to_array=to_array),
        dtype=jnp.bfloat16, policies=default_policies(FLUX_DEV, "pisa", block_size=args.block_size))
    jax.block_until_ready(nnx.state(model))
    results["weight_copy_s"] = time.perf_counter() - t0
    del tmodel
    torch.cuda.empty_cache()
    graphdefs = {}
    for impl in args.implementations:   # same weights, the PISA layers on another backend
        for _, module in nnx.iter_graph(model):
            if isinstance(module, Attention) and module.policy.kind == "pisa":
                module.policy = dataclasses.replace(module.policy, implementation=impl)
        graphdefs[impl], state = nnx.split(model)

    # The weights travel as a flat list: flattening the `nnx.State` tree on every call
    # cost about 2.5 ms of host time per call in a CPU test (0.24 ms for the list), time
    # that a blocking wall-clock measurement would count.
    weights, tree = jax.tree.flatten(state)

    @functools.partial(jax.jit, static_argnames=("graphdef", "dense"))
    def forward(weights, io, graphdef, dense):
        return nnx.merge(graphdef, jax.tree.unflatten(tree, weights))(
            io["img"], io["img_ids"], io["txt"], io["txt_ids"], io["timesteps"], io["y"],
            io["guidance"], dense=dense)

    for size in sizes:
        io = {k: jnp.asarray(v, jnp.bfloat16 if k in ("img", "txt", "y") else jnp.float32)
              for k, v in inputs(size).items()}
        r = results["sizes"][str(size)]
        outs = {}
        first = args.implementations[0]
        modes = [("dense", first)] + [("pisa" if impl == first else f"pisa_{impl}", impl)
                                      for impl in args.implementations]
        compiled = {}
        for mode, impl in modes:
            t0 = time.perf_counter()
            compiled[mode] = forward.lower(weights, io, graphdefs[impl],
                                           dense=mode == "dense").compile()
            r[f"{mode}_compile_s"] = time.perf_counter() - t0
            r[f"{mode}_temp_gib"] = compiled[mode].memory_analysis().temp_size_in_bytes / 2**30
            outs[mode] = jax.block_until_ready(compiled[mode](weights, io))
            jax.block_until_ready(compiled[mode](weights, io))
        # The modes take turns, so that whatever drifts during the run (the GPU's clock
        # under sustained load) touches each alike: timed one after the other, the second
        # mode's matrix products took 5% longer in one profiled run than the first's.
        times = {mode: [] for mode, _ in modes}
        for _ in range(5):
            for mode, _ in modes:
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[mode](weights, io))
                times[mode].append(time.perf_counter() - t0)
        for mode, _ in modes:
            r[f"{mode}_ms"] = 1e3 * statistics.median(times[mode])
            print(f"{size}: ours {mode} {r[f'{mode}_ms']:.1f} ms, compile "
                  f"{r[f'{mode}_compile_s']:.1f} s, temp {r[f'{mode}_temp_gib']:.1f} GiB", flush=True)
            if args.profile:
                r[f"{mode}_gpu_ms"] = gpu_profile(compiled[mode], (weights, io))
        del compiled
        dense = np.asarray(outs["dense"], np.float32)
        if size == sizes[0] and f32_out is not None:
            r["dense_vs_diffusers_f32_rel"] = rel(dense, f32_out)
            r["pisa_vs_diffusers_f32_rel"] = rel(np.asarray(outs["pisa"], np.float32), f32_out)
        r["pisa_vs_dense_rel"] = rel(np.asarray(outs["pisa"], np.float32), dense)
        if size in ref_out:
            r["dense_vs_diffusers_rel"] = rel(dense, ref_out[size])
        r["pisa_speedup_over_dense"] = r["dense_ms"] / r["pisa_ms"]
        for mode, impl in modes[2:]:
            r[f"{mode}_vs_dense_rel"] = rel(np.asarray(outs[mode], np.float32), dense)
            r[f"{mode}_speedup_over_dense"] = r["dense_ms"] / r[f"{mode}_ms"]
        stats = jax.devices()[0].memory_stats() or {}
        r["jax_peak_gib_so_far"] = stats.get("peak_bytes_in_use", 0) / 2**30
        save()

    print(f"\n{'size':>6} {'diffusers ms':>13} {'dense ms':>9} {'PISA ms':>8} {'PISA/dense':>10} "
          f"{'compile s (d/p)':>16} {'rel. diff vs diffusers':>23}")
    for size, r in results["sizes"].items():
        print(f"{size:>6} {r.get('diffusers_ms', float('nan')):13.1f} {r['dense_ms']:9.1f} "
              f"{r['pisa_ms']:8.1f} {r['pisa_speedup_over_dense']:9.2f}x "
              f"{r['dense_compile_s']:7.1f}/{r['pisa_compile_s']:<7.1f} "
              f"{r.get('dense_vs_diffusers_rel', float('nan')):23.4f}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
