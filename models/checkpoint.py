"""Checkpoint reading and writing shared by every model: safetensors files (single or
sharded with an index JSON), tensors read lazily as JAX arrays (bf16 included, no torch),
JSON configs, filling an NNX model from a tensor stream, and folders written atomically.
The conversion of official checkpoints built on it is `models.conversion`.

Every failure is a `CheckpointError` that names the file and says what is wrong.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open

DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or converted: which file or tensor, what is wrong."""


# ------------------------------------------------------------------------- reading

def read_json(path: str) -> dict:
    """The JSON object in `path`; a `CheckpointError` naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise _os_error(path, e, "a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _os_error(path: str, e: OSError, what: str) -> CheckpointError:
    """A `CheckpointError` naming `path` and the cause of an OS error."""
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"{path}: no such file")
    if isinstance(e, PermissionError):
        return CheckpointError(f"{path}: permission denied (cannot read)")
    if isinstance(e, IsADirectoryError):
        return CheckpointError(f"{path}: is a folder, expected {what}")
    return CheckpointError(f"{path}: cannot read ({e.strerror or e})")


def _open_safetensors(path: str):
    """`safe_open` with errors that name the file and the cause.

    The file is opened for reading first, so that a missing file, a file without read
    permission (mode 000) and a folder are told apart, and an empty file is named as such.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise _os_error(path, e, "a .safetensors file") from None
    if not head:
        raise CheckpointError(f"{path}: empty file, expected safetensors data")
    try:
        return safe_open(path, framework="flax")
    except Exception as e:     # safetensors raises its own error type for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or "
                              f"corrupt ({e})") from None


class TensorFiles:
    """Lazy access to the tensors of one or several safetensors files.

    Names are unique across the files; `strip_prefix` is removed from names that have it.
    Use as a context manager (or call `close`) to release the open files.
    """

    def __init__(self, files: Iterable[str], strip_prefix: str = ""):
        self._where: dict[str, tuple[str, str]] = {}
        self._handles: dict[str, object] = {}
        for path in files:
            with _open_safetensors(path) as f:
                keys = list(f.keys())
            for key in keys:
                name = key[len(strip_prefix):] if key.startswith(strip_prefix) else key
                if name in self._where:
                    raise CheckpointError(f"tensor {name!r} is in both {self._where[name][0]} "
                                          f"and {path}")
                self._where[name] = (path, key)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        path, key = self._where[name]
        return tuple(self._open(path).get_slice(key).get_shape())

    def get(self, name: str) -> jax.Array:
        path, key = self._where[name]
        try:
            return self._open(path).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r}, the file is "
                                  f"truncated or corrupt ({e})") from None

    def _open(self, path):
        if path not in self._handles:
            self._handles[path] = _open_safetensors(path).__enter__()
        return self._handles[path]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class TensorDict:
    """The `TensorFiles` interface over tensors already in memory (e.g. a state dict)."""

    def __init__(self, tensors: dict, to_array: Callable = jnp.asarray):
        self._tensors = tensors
        self._to_array = to_array

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> jax.Array:
        return self._to_array(self._tensors[name])

    def close(self) -> None:
        pass

    def __enter__(self) -> "TensorDict":
        return self

    def __exit__(self, *exc) -> None:
        pass


class TensorStream:
    """An iterator of `(name, array)` read from open tensor files, which it closes when
    exhausted, when reading fails, or on `close()` / leaving a `with` block (also when it
    was never iterated)."""

    def __init__(self, files, items: Iterator[tuple[str, jax.Array]]):
        self._files = files
        self._items = items

    def __iter__(self) -> "TensorStream":
        return self

    def __next__(self) -> tuple[str, jax.Array]:
        try:
            return next(self._items)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._files.close()

    def __enter__(self) -> "TensorStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of a folder: the shards its `*.safetensors.index.json` names
    (all must exist), else every `*.safetensors` in it."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    try:
        os.listdir(folder)
    except OSError as e:
        raise _os_error(folder, e, "a folder") from None
    index = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
    if index:
        meta = read_json(index[0])
        weight_map = meta.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index[0]}: expected a non-empty 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{index[0]} names shards that are not there: {missing}")
        return [os.path.join(folder, s) for s in shards]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files (and no index JSON)")
    return files


# ------------------------------------------------------------------- NNX models

def flat_params(abstract_model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Dotted Flax path -> abstract value of every `nnx.Param` of an abstract model."""
    flat = nnx.to_flat_state(nnx.state(abstract_model, nnx.Param))
    return {".".join(map(str, p)): v for p, v in flat}


def fill_model(abstract_model: nnx.Module, tensors: Iterable[tuple[str, jax.Array]],
               *, dtype=None) -> nnx.Module:
    """A concrete model: `abstract_model` (from `nnx.eval_shape`) with every parameter
    taken from the `(dotted Flax path, array)` stream `tensors`.

    Raises `CheckpointError` for a name the model does not have, a shape it does not
    expect, or a parameter the stream never gave. Arrays are cast to `dtype` if given,
    else to the parameter's own dtype.
    """
    graphdef, state = nnx.split(abstract_model)
    flat = dict(nnx.to_flat_state(state))
    by_name = {".".join(map(str, p)): p for p in flat}
    params = set(flat_params(abstract_model))
    filled = set()
    for name, x in tensors:
        if name not in by_name:
            raise CheckpointError(f"unexpected tensor {name!r}: the model has no such "
                                  "parameter")
        p = by_name[name]
        want = flat[p].get_value() if hasattr(flat[p], "get_value") else flat[p].value
        if tuple(x.shape) != tuple(want.shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(x.shape)}; the model "
                                  f"expects {tuple(want.shape)}")
        flat[p] = flat[p].replace(jnp.asarray(x, dtype or want.dtype))
        filled.add(name)
    missing = sorted(params - filled)
    if missing:
        raise CheckpointError(f"missing tensors: {_listing(missing)}")
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def _listing(names: list[str]) -> str:
    """The first 20 names, and ' ...' when there are more (for error messages here and in
    `models.conversion`)."""
    return f"{names[:20]}{' ...' if len(names) > 20 else ''}"


# ------------------------------------------------------------------------- writing

def check_writable_output(out: str) -> None:
    """Fails early, before any work, if `out` exists or its parent cannot be written."""
    if os.path.exists(out):
        raise CheckpointError(f"output {out} already exists; remove it or choose another path")
    parent = os.path.dirname(os.path.abspath(out))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CheckpointError(f"cannot write {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {out}: no permission to write in {probe}")


@contextlib.contextmanager
def atomic_folder(out: str) -> Iterator[str]:
    """Yields a temporary folder beside `out`, renamed to `out` when the block succeeds
    and removed when it fails, so `out` is either complete or absent. The folder and the
    files in it get the permissions the umask gives, like any folder the user makes."""
    check_writable_output(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                os.chmod(path, 0o666 & ~umask)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_sharded(folder: str, tensors: Iterable[tuple[str, jax.Array]], *,
                  shard_bytes: int = 2 << 30, prefix: str = "model",
                  progress: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Writes a `(name, array)` stream as `prefix-XXXXX.safetensors` shards of about
    `shard_bytes` each into `folder`; returns (tensors, shards)."""
    from safetensors.flax import save_file
    shard, size, n_shards, n_tensors = {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n_shards
        if shard:
            n_shards += 1
            save_file(shard, os.path.join(folder, f"{prefix}-{n_shards:05d}.safetensors"))
            shard, size = {}, 0

    for name, x in tensors:
        shard[name] = x
        size += x.size * x.dtype.itemsize
        n_tensors += 1
        if size >= shard_bytes:
            flush()
            if progress is not None:
                progress(f"  {n_tensors} tensors written")
    flush()
    return n_tensors, n_shards
