"""The helpers the generating commands share (models/cli_common.py)."""

from __future__ import annotations

import argparse
import os

import pytest

from models.cli_common import atomic_write, batch_seeds, check_output_file, timing_line


def test_atomic_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path):
    out = tmp_path / "sub" / "a.png"
    atomic_write(str(out), lambda f: f.write(b"first"))
    assert out.read_bytes() == b"first"

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(out), fail)
    assert out.read_bytes() == b"first"
    assert os.listdir(out.parent) == ["a.png"]          # no temporary file left behind


def test_output_file_checks_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match=r"--out must end in \.webp; got .*a\.png"):
        check_output_file(str(tmp_path / "a.png"), ".webp")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(ValueError, match="is a folder; give a file name ending in .png"):
        check_output_file(str(tmp_path / "d.png"), ".png")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a folder we may write in"):
        check_output_file(str(tmp_path / "f" / "a.png"), ".png")
    check_output_file(str(tmp_path / "new" / "deeper" / "a.png"), ".png")   # made when written


def test_batch_seeds_and_timing_line():
    assert batch_seeds(argparse.Namespace(seed=7, batch=3)) == [7, 8, 9]
    with pytest.raises(ValueError, match="--batch must be >= 1; got 0"):
        batch_seeds(argparse.Namespace(seed=7, batch=0))
    line = timing_line(1.0, {"compile": 2.0, "text_encoding": 0.5, "denoising": 4.0,
                             "decoding": 0.25}, steps=8)
    assert line == ("timings: load 1.0 s, compile 2.0 s, text encoding 0.50 s, denoising "
                    "4.00 s (0.500 s/step), decoding 0.25 s")
