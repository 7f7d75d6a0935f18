"""Checkpoint reading and writing (models/checkpoint.py) and the FLUX converter's answers to
bad files: every failure names the file and says what is wrong, outputs honour the umask,
nothing is left open or half-written."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest
from safetensors.numpy import save_file

from models import checkpoint
from models.checkpoint import CheckpointError, TensorFiles, atomic_folder, read_json
from models.flux.convert import convert, load_flux, main as convert_main

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BFL = os.path.join(FIXTURES, "flux_schnell_bfl.safetensors")
DIFFUSERS = os.path.join(FIXTURES, "flux_schnell_diffusers")
QUIET = dict(progress=lambda *_: None)
as_root = os.geteuid() == 0


def _small_file(path):
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(path))
    return str(path)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


# --------------------------------------------------------------- unreadable inputs

@pytest.mark.parametrize("make,pattern", [
    (lambda p: p.write_bytes(b""), "empty file, expected safetensors data"),
    (lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
     "not a readable safetensors file, truncated or corrupt"),
    (lambda p: p.write_bytes(open(BFL, "rb").read()[:5000]),
     "not a readable safetensors file, truncated or corrupt"),
    (lambda p: p.mkdir(), "is a folder, expected a .safetensors file"),
    (lambda p: None, "no such file"),
])
def test_bad_safetensors_files_are_named(tmp_path, make, pattern):
    path = tmp_path / "w.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=f"{path}: {pattern}"):
        TensorFiles([str(path)])


def test_truncated_data_after_a_valid_header_is_named(tmp_path):
    path = tmp_path / "cut.safetensors"
    data = open(BFL, "rb").read()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{path}: .*truncated or corrupt"):
        with TensorFiles([str(path)]) as files:
            for name in sorted(files.names()):
                files.get(name)


def test_unreadable_file_is_permission_denied_not_missing(tmp_path, monkeypatch):
    path = _small_file(tmp_path / "locked.safetensors")
    real_open = open

    def denied(p, *a, **kw):   # as a user without read permission sees it
        if str(p) == path:
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *a, **kw)

    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
    with pytest.raises(CheckpointError, match=f"{path}: permission denied"):
        TensorFiles([path])


@pytest.mark.skipif(as_root, reason="root reads mode-000 files")
def test_mode_000_file_is_permission_denied(tmp_path):
    path = _small_file(tmp_path / "locked.safetensors")
    os.chmod(path, 0)
    with pytest.raises(CheckpointError, match=f"{path}: permission denied"):
        TensorFiles([path])


@pytest.mark.parametrize("text,pattern", [
    ("", "not valid JSON"), ("{\"a\": ", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
])
def test_corrupt_json_is_named(tmp_path, text, pattern):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=f"{path}: {pattern}"):
        read_json(str(path))


def _diffusers_copy(tmp_path, edit):
    folder = tmp_path / "transformer"
    shutil.copytree(DIFFUSERS, folder)
    edit(folder)
    return str(folder)


def _first_shard(folder):
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    return folder / sorted(set(index["weight_map"].values()))[0]


@pytest.mark.parametrize("edit,pattern", [
    (lambda f: (f / "config.json").write_text("{"), r"config.json: not valid JSON"),
    (lambda f: (f / "config.json").write_text('{"num_layers": "two"}'),
     r"config.json: not a valid FLUX configuration \(FluxConfig.depth must be an integer"),
    (lambda f: (f / "diffusion_pytorch_model.safetensors.index.json").write_text("{"),
     r"index.json: not valid JSON"),
    (lambda f: _first_shard(f).write_bytes(b""), r"00001-of-00010.safetensors: empty file"),
    (lambda f: _first_shard(f).unlink(), r"index.json names shards that are not there"),
    (lambda f: _first_shard(f).write_bytes(_first_shard(f).read_bytes()[:300]),
     r"00001-of-00010.safetensors: not a readable safetensors file, truncated or corrupt"),
])
def test_load_flux_and_convert_name_the_bad_file(tmp_path, edit, pattern):
    src = _diffusers_copy(tmp_path, edit)
    with pytest.raises(CheckpointError, match=pattern):
        load_flux(src, attention="dense")
    with pytest.raises(CheckpointError, match=pattern):
        convert(src, str(tmp_path / "out"), **QUIET)
    assert not (tmp_path / "out").exists()


def test_converted_folder_without_shards_or_with_a_bad_config_is_named(tmp_path):
    out = tmp_path / "conv"
    convert(BFL, str(out), axes_dim=(4, 6, 6), **QUIET)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"axes_dim": [-4, 10, 10]}))
    with pytest.raises(CheckpointError, match=r"config.json: not a valid FLUX configuration "
                                              r"\(axes_dim .* got \[-4, 10, 10\]"):
        load_flux(str(out))
    (out / "config.json").write_text(json.dumps(cfg | {"colour": "blue"}))
    with pytest.raises(CheckpointError, match="unexpected keyword argument 'colour'"):
        load_flux(str(out))
    (out / "config.json").write_text(json.dumps(cfg))
    for shard in out.glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(CheckpointError, match="without its model-\\*.safetensors shards"):
        load_flux(str(out))


# -------------------------------------------------------------------- closing files

def _mapped(path):
    """How often `path` is open or memory-mapped in this process."""
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
           if os.path.exists(f"/proc/self/fd/{fd}")]
    with open("/proc/self/maps") as f:
        maps = f.read()
    real = os.path.realpath(path)
    return sum(real == x for x in fds) + maps.count(real)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_source_files_are_closed_after_convert_load_and_failures(tmp_path):
    src = str(tmp_path / "src.safetensors")
    shutil.copy(BFL, src)
    with TensorFiles([src]) as files:
        files.get(sorted(files.names())[0])
        assert _mapped(src) >= 1                         # the probe sees an open file
    assert _mapped(src) == 0
    convert(src, str(tmp_path / "out"), axes_dim=(4, 6, 6), **QUIET)
    assert _mapped(src) == 0
    load_flux(src, attention="dense", axes_dim=(4, 6, 6))
    assert _mapped(src) == 0
    # A failure after the files were opened (policies of the wrong length) closes them too.
    with pytest.raises(ValueError, match="policies must hold one entry per attention layer"):
        load_flux(src, policies=(), axes_dim=(4, 6, 6))
    assert _mapped(src) == 0


# ------------------------------------------------------------------------ writing

@pytest.mark.parametrize("mask,folder_mode,file_mode", [(0o022, 0o755, 0o644),
                                                        (0o077, 0o700, 0o600),
                                                        (0o002, 0o775, 0o664)])
def test_written_folders_honour_the_umask(tmp_path, umask, mask, folder_mode, file_mode):
    umask(mask)
    out = tmp_path / "conv"
    convert(BFL, str(out), axes_dim=(4, 6, 6), **QUIET)
    assert stat.S_IMODE(os.stat(out).st_mode) == folder_mode
    files = list(out.iterdir())
    assert len(files) >= 2
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == file_mode, f.name


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(str(tmp_path / "out")) as tmp:
            _small_file(os.path.join(tmp, "a.safetensors"))
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: False if os.fspath(p) == str(locked)
                        else real_access(p, m, **kw))
    read = []
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **kw: read.append(a))
    assert convert_main([BFL, str(locked / "out"), "--axes-dim", "4,6,6"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: cannot write {locked / 'out'}: no permission to write in {locked}"
    assert read == []                                     # refused before reading anything
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        checkpoint.check_writable_output(BFL + "/out")


@pytest.mark.skipif(as_root, reason="root writes into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert convert_main([BFL, str(locked / "out"), "--axes-dim", "4,6,6"]) == 1
    assert "no permission to write in" in capsys.readouterr().err


@pytest.mark.parametrize("axes,pattern", [
    ("-4,10,10", "argument --axes-dim: expected three comma-separated positive even integers"),
    ("4,6", "argument --axes-dim: expected three values"),
    ("4,x,6", "argument --axes-dim: expected three comma-separated positive even integers"),
    ("4,4,4", r"axes_dim .* summing to the head dim 16 .* got \(4, 4, 4\)"),
])
def test_bad_axes_dim_is_refused_before_writing(tmp_path, capsys, axes, pattern):
    out = tmp_path / "out"
    try:
        code = convert_main([BFL, str(out), f"--axes-dim={axes}"])
    except SystemExit as e:           # argparse's own refusal
        code = e.code
    assert code in (1, 2)
    assert __import__("re").search(pattern, capsys.readouterr().err)
    assert not out.exists()
