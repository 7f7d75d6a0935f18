"""Conversion of official checkpoints to this project's Flax layout, the half of every
converter that does not depend on the model: where a source checkpoint is
(`locate_checkpoint`), its tensor names and layouts (`Recipe`, `torch_layout`,
`same_layout`), a stream that checks every name and shape before reading any tensor
(`plan_stream`), writing the result atomically (`write_converted`) and the command line
shared by every converter (`add_conversion_arguments`, `run_conversion`). Each model's
converter keeps only its names and configs.

Built on `models.checkpoint`; every failure is a `CheckpointError`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp

from models.checkpoint import (DTYPES, CheckpointError, TensorStream, _listing, atomic_folder,
                               check_writable_output, read_json, write_sharded)


# ---------------------------------------------------------------------- locating

def locate_checkpoint(src: str, accepted: str) -> tuple[str, str, dict | None]:
    """Where a model's checkpoint SRC is: ('file', path, None) for a `.safetensors` file,
    ('folder', src, its config.json) for a folder with one, ('pipeline', src/transformer,
    None) for a pipeline folder. Anything else is a `CheckpointError` that says SRC is
    neither of `accepted` (the caller's list of the sources it takes)."""
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise CheckpointError(f"expected a .safetensors single file or a folder; got {src}")
        return "file", src, None
    if not os.path.isdir(src):
        raise CheckpointError(f"no such file or folder: {src}")
    if os.path.isfile(os.path.join(src, "config.json")):
        return "folder", src, read_json(os.path.join(src, "config.json"))
    if os.path.isfile(os.path.join(src, "transformer", "config.json")):
        return "pipeline", os.path.join(src, "transformer"), None
    raise CheckpointError(f"{src} is neither {accepted}")


# ---------------------------------------------------------------------- planning

# Checkpoint name -> (source tensors, how to combine them into that tensor).
Recipe = dict[str, tuple[list[str], Callable]]


def torch_layout(flax_path: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """(PyTorch name, axes) of a Flax parameter with `ndim` dimensions: a kernel `X.kernel`
    is `transpose(X.weight, axes)` (Linear `[out, in]` -> `[in, out]`, Conv
    `[out, in, *k]` -> `[*k, in, out]`); any other parameter keeps its name (axes None)."""
    if flax_path.endswith(".kernel"):
        return flax_path[: -len("kernel")] + "weight", tuple(range(2, ndim)) + (1, 0)
    return flax_path, None


def same_layout(flax_path: str, ndim: int) -> tuple[str, None]:
    """The `source_name` of a checkpoint already in the Flax layout."""
    return flax_path, None


def plan_stream(files, expected: dict[str, jax.ShapeDtypeStruct], recipe: Recipe, *,
                dtype=None, model: str, source_name: Callable = torch_layout,
                ignore: Callable[[str], bool] = lambda name: False, where: str = "",
                squeeze: bool = False) -> TensorStream:
    """A `(Flax path, array)` stream that converts the tensors of `files` (`TensorFiles` or
    `TensorDict`) for a model whose parameters are `expected` (`flat_params`).

    `source_name(flax_path, ndim)` gives each parameter's checkpoint name and the axes its
    tensor is transposed with (None: as is); `recipe` gives the source tensors that name
    is made of and how to combine them (several are stacked along their first axis, e.g.
    q, k, v into one qkv). Arrays are cast to `dtype`, or with `dtype=None` each to its
    parameter's own dtype (a model that keeps some parameters in float32). Tensors of
    `files` for which `ignore(name)` is true (buffers, tied copies) are neither read nor
    reported as unexpected. With `squeeze`, a source tensor may have extra trailing
    size-1 axes (a 1x1 convolution standing for a linear layer); they are dropped.

    Raises `CheckpointError` before anything is read when names or shapes do not match:
    the missing and unexpected tensors (`model` names the model in the message), or the
    first tensor whose shape is not the model's (in the checkpoint's layout); messages
    start with `where: ` when `where` (the file or folder) is given. `files` is closed on
    that error and when the stream is exhausted or closed.
    """
    try:
        plan, missing = {}, []
        for flax_path, value in expected.items():
            name, axes = source_name(flax_path, len(value.shape))
            if name not in recipe:
                missing.append(name)
                continue
            plan[flax_path] = (name, recipe[name], axes, tuple(value.shape),
                               value.dtype if dtype is None else dtype)
        needed = {n for _, (names, _), _, _, _ in plan.values() for n in names}
        present = {n for n in files.names() if n in needed or not ignore(n)}
        absent, unexpected = sorted(needed - present), sorted(present - needed)
        prefix = f"{where}: " if where else ""
        if missing or absent or unexpected:
            raise CheckpointError(
                f"{prefix}checkpoint does not match the {model} model inferred from it: "
                + "; ".join(f"{what}: {_listing(names)}"
                            for what, names in (("missing", sorted(missing) + absent),
                                                ("unexpected", unexpected)) if names))
        for name, (names, _), axes, shape, _ in plan.values():
            got = [files.shape(n) for n in names]
            stacked = got[0] if len(got) == 1 else (sum(s[0] for s in got),) + got[0][1:]
            want = shape if axes is None else tuple(shape[axes.index(i)] for i in range(len(axes)))
            extra = stacked[len(want):] if squeeze else ()
            if stacked[:len(stacked) - len(extra)] != want or any(d != 1 for d in extra):
                raise CheckpointError(
                    f"{prefix}tensor {names if len(names) > 1 else names[0]} has shape "
                    f"{got if len(got) > 1 else got[0]}; the model expects {want}"
                    + (" (trailing size-1 axes allowed)" if squeeze else "")
                    + ("" if names == [name] else f" for {name}"))
    except BaseException:
        files.close()
        raise

    def stream():
        for flax_path, (_, (names, combine), axes, shape, to) in plan.items():
            x = combine(*(files.get(n) for n in names))
            if squeeze and x.ndim > len(shape):
                x = x.reshape(x.shape[:len(shape)])
            yield flax_path, (x if axes is None else jnp.transpose(x, axes)).astype(to)

    return TensorStream(files, stream())


# ------------------------------------------------------------------------- writing

def write_converted(out: str, open_source: Callable[[], tuple[object, TensorStream]], *,
                    format: str, dtype, progress: Callable[[str], None] = print) -> str:
    """Writes a converted checkpoint into the folder `out`; returns `out`.

    `out` must not exist and must be writable, checked before `open_source()` reads
    anything. That gives (config with `to_json()`, `(Flax path, array)` stream); the stream
    is written as shards (`write_sharded`) and the config as `config.json` with `format`
    and the `dtype` name added, on the CPU and atomically (`atomic_folder`): on any error
    `out` is left absent. The stream is closed when this returns or fails.
    """
    check_writable_output(out)
    with jax.default_device(jax.devices("cpu")[0]):     # conversion needs no accelerator
        cfg, tensors = open_source()
        with tensors, atomic_folder(out) as tmp:
            n_tensors, n_shards = write_sharded(tmp, tensors, progress=progress)
            meta = json.loads(cfg.to_json()) | {"format": format,
                                                "dtype": jnp.dtype(dtype).name}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(meta, f, indent=1)
    progress(f"wrote {n_tensors} tensors in {n_shards} shard(s) to {out}")
    return out


def add_conversion_arguments(parser, src_help: str) -> None:
    """The arguments every converter CLI takes: SRC, OUT and --dtype."""
    parser.add_argument("src", help=src_help)
    parser.add_argument("out", help="output folder (must not exist)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="dtype of the written weights (default bf16)")


def run_conversion(convert: Callable[[], object], out: str) -> int:
    """Runs `convert()` for a CLI: 0, or 1 with `error: ...` on stderr for a bad checkpoint
    or argument, or an OS error while writing (e.g. a full disk, named by file)."""
    try:
        convert()
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def checked_config(source: str, make: Callable, model: str):
    """`make()` (a config constructor); a config that does not check out (TypeError or
    ValueError) is reported as a `CheckpointError` against `source`, naming the `model`."""
    try:
        return make()
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: not a valid {model} configuration ({e})") from None
