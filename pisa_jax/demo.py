"""`pisa-jax demo`: PISA against dense and keep-or-drop attention on a structured problem.

The problem imitates an image diffusion transformer's self-attention: tokens on a 2D
latent grid put in tile-major order (each block is an 8 x 8 spatial tile, as PISA's FLUX
integration does), queries, keys and values that are smooth random fields over the
grid, and a FLUX-style 2D rotary embedding on queries and keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pisa_jax as pj
from pisa_jax.metrics import relative_error, time_per_call
from pisa_jax.tokens import tile_major_permutation


def tile_major_order(height: int, width: int, block_size: int = 64) -> np.ndarray:
    """Raster index of each token in tile-major order (8 x 8 tiles for block size 64)."""
    ys, xs = np.divmod(np.arange(height * width), width)
    return np.asarray(tile_major_permutation(ys, xs, block_size))


def rope_2d(x: np.ndarray, ys: np.ndarray, xs: np.ndarray, theta: float = 10000.0):
    """Rotary embedding on two position axes, half the head dim each, pairs interleaved."""
    d = x.shape[-1]
    out = np.empty_like(x)
    for axis_pos, lo in ((ys, 0), (xs, d // 2)):
        half = d // 2
        freqs = theta ** (-np.arange(0, half, 2) / half)
        ang = axis_pos[:, None] * freqs[None, :]                       # [T, half/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]   # [T, 1, half/2]
        a, b = x[..., lo:lo + half:2], x[..., lo + 1:lo + half:2]
        out[..., lo:lo + half:2] = a * cos - b * sin
        out[..., lo + 1:lo + half:2] = a * sin + b * cos
    return out


def structured_problem(seed: int = 0, side: int = 48, heads: int = 4, head_dim: int = 64,
                       batch: int = 1):
    """q, k, v `[B, T, H, D]` float32 with T = side**2 tokens in tile-major order."""
    rng = np.random.default_rng(seed)
    order = tile_major_order(side, side)
    ys, xs = np.divmod(order, side)
    pos = np.stack([ys, xs], 1) / side
    fields = []
    for _ in range(3):
        freqs = rng.normal(size=(2, 12)) * 4.0
        phase = rng.uniform(0, 2 * np.pi, size=12)
        basis = np.cos(pos @ freqs + phase)                                # [T, 12]
        mix = rng.normal(size=(batch, heads, 12, head_dim)) / np.sqrt(12)
        x = np.einsum("tf,bhfd->bthd", basis, mix) + 0.05 * rng.standard_normal(
            (batch, len(order), heads, head_dim))
        fields.append(x)
    q, k, v = fields
    q = rope_2d(2.0 * q, ys.astype(float), xs.astype(float))
    k = rope_2d(2.0 * k, ys.astype(float), xs.astype(float))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def run(side: int = 48, heads: int = 4, head_dim: int = 64, densities=(0.1, 0.15, 0.25, 0.5),
        seed: int = 0, print_fn=None) -> list[dict]:
    """Prints (each row as soon as it is measured) and returns one row per method:
    relative error vs dense and ms per call. `print_fn` defaults to a flushing print."""
    print_fn = print_fn or functools.partial(print, flush=True)
    on_gpu = jax.default_backend() == "gpu"
    impl = "triton" if on_gpu else "reference"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    t = side * side
    print_fn(f"PISA demo: {side}x{side} tokens (T = {t}) in 8x8 tile-major order, {heads} heads, "
             f"D = {head_dim}, {jnp.dtype(dtype).name}, block size 64, "
             f"implementation: {impl} on {jax.default_backend()}")
    print_fn("  density: fraction of key blocks each query block computes exactly\n"
             "  rel. error vs dense: ||out - exact|| / ||exact||, exact = float32 dense attention\n"
             "  ms/call: median time of one jitted call, after compiling\n"
             f"{1 + 3 * len(densities)} rows, each printed once compiled and timed:\n")
    q, k, v = structured_problem(seed, side, heads, head_dim)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    exact = pj.dense_attention(q, k, v, implementation="reference").astype(jnp.float32)
    print_fn(f"{'method':<14} {'density':>7} {'rel. error vs dense':>20} {'ms/call':>9}")
    rows = []

    def add(method, density, fn):
        rows.append(dict(method=method, density=density, error=relative_error(fn(q, k, v), exact),
                         ms=1e3 * time_per_call(fn, q, k, v, reps=5, target_s=0.0)))
        r = rows[-1]
        print_fn(f"{r['method']:<14} {_density(r['density']):>7} {r['error']:>20.4f} "
                 f"{r['ms']:>9.2f}")

    add("dense", 1.0, jax.jit(lambda q, k, v: pj.dense_attention(q, k, v)))
    names = {1: "PISA order 1", 0: "PISA order 0", -1: "keep-or-drop"}
    for density in densities:
        for order in (1, 0, -1):
            add(names[order], density, jax.jit(
                lambda q, k, v, d=density, o=order: pj.piecewise_sparse_attention(
                    q, k, v, density=d, order=o, use_bias=True, implementation=impl)))
    if not on_gpu:
        print_fn("\n(no GPU: the reference forms every logit, so these times show no speedup; "
                 "the Pallas kernels on an H200 do, see benchmarks/RESULTS.md)")
    return rows


def _density(d: float) -> str:
    """Two decimals where they show the value, more where they would round it away."""
    text = f"{d:.2f}"
    return text if float(text) == d else f"{d:.3g}"


def check_plotting() -> None:
    """Raises SystemExit with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'pisa-jax[plot]'") from None


def plot(rows: list[dict], path: str) -> None:
    """Relative error against dense attention per density, one line per method."""
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("PISA order 1", "PISA order 0", "keep-or-drop"):
        pts = [(r["density"], r["error"]) for r in rows if r["method"] == method]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("density (fraction of key blocks computed exactly)")
    ax.set_ylabel("relative error vs dense attention")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("PISA on a structured attention problem")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
