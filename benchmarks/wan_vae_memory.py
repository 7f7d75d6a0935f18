"""Memory of the Wan2.1 video autoencoder, streaming against whole clip, as XLA plans it.

For each clip size the decoder and the encoder (Wan2.1's released VAE config, bf16
weights, batch 1) are lowered and compiled from abstract inputs on the default backend,
and XLA's `memory_analysis()` gives the temporary bytes the program needs beyond its
arguments and outputs. Nothing is run, so this works on a CPU (where the figures are
XLA's CPU plan; a GPU's may differ somewhat).

    python benchmarks/wan_vae_memory.py --sizes 81x480x832,81x720x1280 --out vae-memory.json
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from models.wan import WAN_VAE, WanAutoencoder


def clip_size(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FRAMESxHEIGHTxWIDTH, e.g. 81x480x832; "
                                         f"got {text!r}") from None
    if f < 1 or (f - 1) % 4 or h < 8 or h % 8 or w < 8 or w % 8:
        raise argparse.ArgumentTypeError(f"frames must be 1 + 4k and height, width positive "
                                         f"multiples of 8; got {text!r}")
    return f, h, w


def temp_gib(graph, state, method: str, streaming: bool, x) -> float:
    fn = jax.jit(lambda s, x: getattr(nnx.merge(graph, s), method)(x, streaming=streaming))
    analysis = fn.lower(state, x).compile().memory_analysis()
    return analysis.temp_size_in_bytes / 2**30


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="81x480x832,81x720x1280",
                   type=lambda s: [clip_size(x) for x in s.split(",")],
                   help="clips as FRAMESxHEIGHTxWIDTH, comma-separated")
    p.add_argument("--out", default="vae-memory.json", help="JSON file to write")
    args = p.parse_args(argv)
    model = nnx.eval_shape(lambda: WanAutoencoder(WAN_VAE, rngs=nnx.Rngs(0),
                                                  dtype=jnp.bfloat16))
    graph, state = nnx.split(model)
    z = WAN_VAE.z_dim
    results = {"backend": jax.default_backend(), "jax": jax.__version__, "sizes": {}}
    for f, h, w in args.sizes:
        video = jax.ShapeDtypeStruct((1, f, h, w, 3), jnp.bfloat16)
        latents = jax.ShapeDtypeStruct((1, (f - 1) // 4 + 1, h // 8, w // 8, z), jnp.float32)
        r = {}
        for method, x in (("decode", latents), ("encode", video)):
            for streaming in (True, False):
                key = f"{method}_{'streaming' if streaming else 'whole_clip'}_temp_gib"
                r[key] = temp_gib(graph, state, method, streaming, x)
                print(f"{f}x{h}x{w} {key}: {r[key]:.2f}", flush=True)
        results["sizes"][f"{f}x{h}x{w}"] = r
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
