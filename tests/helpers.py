"""Test helpers: error measure, random and structured inputs, an independent float64 PISA,
and the checks every model's tests share (jit against eager, broken checkpoints).

`numpy_pisa` is written from PISA_SPEC.md independently of `pisa_jax.reference`: plain
NumPy loops over query blocks and key blocks, float64 throughout.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from pisa_jax import metrics


def relative_error(out, ref) -> float:
    """The library's relative error, refusing NaN/inf (poisoned, unwritten elements)."""
    assert np.isfinite(np.asarray(out, np.float64)).all(), \
        "output has NaN or inf (unwritten or overflowed elements)"
    return metrics.relative_error(out, ref)


def jit_error(model: nnx.Module, inputs: dict) -> float:
    """Relative error of `model(**inputs)` under `nnx.jit` against the eager call."""
    eager = model(**inputs)
    jitted = nnx.jit(lambda m, io: m(**io))(model, inputs)
    return relative_error(jitted, eager)


def broken_copy(src: str, folder, edit) -> str:
    """Path of a copy of the safetensors file `src` written into `folder` after
    `edit(tensors)` changed its name -> array dict in place (to test a converter's errors)."""
    tensors = load_file(src)
    edit(tensors)
    path = os.path.join(str(folder), "broken.safetensors")
    save_file(tensors, path)
    return path


def broken_folder(src: str, tmp_path, edit,
                  file: str = "diffusion_pytorch_model.safetensors") -> str:
    """Path of a copy of the checkpoint folder `src` (under `tmp_path`) whose `file` had
    `edit(tensors)` applied to its name -> array dict (to test a loader's errors). Read
    and written as JAX arrays, so bfloat16 files stay bfloat16."""
    from safetensors import flax as st
    out = os.path.join(str(tmp_path), os.path.basename(os.path.normpath(src)))
    shutil.copytree(src, out)
    path = os.path.join(out, file)
    tensors = st.load_file(path)
    edit(tensors)
    st.save_file(tensors, path)
    return out


def random_qkv(rng: np.random.Generator, b, t, h, d, layout="bthd", spread=1.0):
    shape = (b, t, h, d) if layout == "bthd" else (b, h, t, d)
    return [spread * rng.standard_normal(shape) for _ in range(3)]


def structured_qkv(rng: np.random.Generator, b, side, h, d, layout="bthd"):
    """Smooth random fields on a `side x side` token grid: neighbours look alike."""
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], 1) / side
    freqs = rng.normal(size=(2, 8)) * 3.0
    basis = np.concatenate([np.sin(pos @ freqs), np.cos(pos @ freqs)], 1)   # [T, 16]
    out = []
    for _ in range(3):
        x = np.einsum("tf,bhfd->bhtd", basis, rng.normal(size=(b, h, 16, d)))
        x = x + 0.1 * rng.standard_normal(x.shape)
        out.append(np.swapaxes(x, 1, 2) if layout == "bthd" else x)
    return out


def to_bhtd(x, layout):
    return np.swapaxes(x, 1, 2) if layout == "bthd" else x


def numpy_pisa(q, k, v, *, density, block_size, scale=None, order=1, use_bias=False,
               forced=(), layout="bthd"):
    """Float64 PISA with explicit loops; returns (output in `layout`, selected sets)."""
    q, k, v = (to_bhtd(np.asarray(x, np.float64), layout) for x in (q, k, v))
    b, h, t, d = q.shape
    s = d ** -0.5 if scale is None else scale
    nt = (t + block_size - 1) // block_size
    spans = [(j * block_size, min(t, (j + 1) * block_size)) for j in range(nt)]
    top_k = max(1, int(density * nt))
    out = np.empty_like(q)
    chosen_sets = np.zeros((b, h, nt, nt), bool)
    for bi in range(b):
        for hi in range(h):
            kc = np.array([k[bi, hi, a:e].mean(0) for a, e in spans])
            qc = np.array([q[bi, hi, a:e].mean(0) for a, e in spans])
            vc = np.array([v[bi, hi, a:e].sum(0) for a, e in spans])
            lens = np.array([e - a for a, e in spans], np.float64)
            hs = [(k[bi, hi, a:e] - kc[j]).T @ v[bi, hi, a:e] for j, (a, e) in enumerate(spans)]
            big_h = sum(hs)
            for i, (qa, qe) in enumerate(spans):
                score = s * kc @ qc[i]
                if use_bias:
                    score = score + np.log(np.array([np.linalg.norm(x) for x in hs]) + 1e-5)
                chosen = set(int(j) % nt for j in forced)
                rest = [j for j in np.argsort(-score, kind="stable") if j not in chosen]
                chosen.update(int(j) for j in rest[:max(0, top_k - len(chosen))])
                chosen_sets[bi, hi, i, sorted(chosen)] = True
                for n in range(qa, qe):
                    x = q[bi, hi, n]
                    logits, weights, values = [], [], []
                    for j, (a, e) in enumerate(spans):
                        if j in chosen:
                            logits.extend(s * k[bi, hi, a:e] @ x)
                            weights.extend([1.0] * (e - a))
                            values.extend(v[bi, hi, a:e])
                    n_exact = len(logits)
                    unchosen = [j for j in range(nt) if j not in chosen]
                    if order >= 0:
                        logits.extend(s * kc[unchosen] @ x)
                    logits = np.array(logits)
                    w = np.exp(logits - logits.max())
                    num = w[:n_exact] @ np.array(values)
                    den = w[:n_exact].sum()
                    if order >= 0 and unchosen:
                        wz = w[n_exact:]
                        g = wz @ lens[unchosen]
                        num = num + wz @ vc[unchosen]
                        den = den + g
                        if order == 1:
                            num = num + g / t * s * (x @ big_h)
                    out[bi, hi, n] = num / den
    if layout == "bthd":
        out = np.swapaxes(out, 1, 2)
    return out, chosen_sets
