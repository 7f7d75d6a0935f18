"""The helpers the generating commands share (models/cli_common.py)."""

from __future__ import annotations

import argparse
import os

import pytest

from models.cli_common import (add_attention_flags, atomic_write, batch_seeds,
                               check_output_file, pisa_settings, policy_options, timing_line)


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


def test_pisa_flags_reach_the_policies_and_the_metadata():
    from models.flux import FLUX_DEV, default_policies
    p = argparse.ArgumentParser()
    add_attention_flags(p)
    given = p.parse_args(["--block-size", "128", "--density", "0.25"])
    assert policy_options(given) == {"density": 0.25, "block_size": 128}
    policies = default_policies(FLUX_DEV, "pisa", **policy_options(given))
    sparse = [q for q in policies if q.kind == "pisa"]
    assert sparse and all(q.block_size == 128 and q.density == 0.25 for q in sparse)
    assert pisa_settings(given, "pisa") == {"density": 0.25, "block_size": 128,
                                            "dense_layers": 4}
    assert pisa_settings(given, "dense") == dict.fromkeys(("density", "block_size",
                                                           "dense_layers"), "n/a")
    defaults = p.parse_args([])
    assert policy_options(defaults) == {}
    assert pisa_settings(defaults, "pisa") == {"density": 0.15, "block_size": 64,
                                               "dense_layers": 4}
    with pytest.raises(SystemExit):   # argparse: "invalid choice: 32 (choose from 64, 128)"
        p.parse_args(["--block-size", "32"])
