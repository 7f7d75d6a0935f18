"""The demo's structured problem, tile-major order, and the `pisa-jax demo` command."""

from __future__ import annotations

import numpy as np

from pisa_jax import demo
from models import cli


def test_tile_major_order_is_a_permutation_with_8x8_tiles():
    order = demo.tile_major_order(20, 12)          # partial tiles on both edges
    assert sorted(order) == list(range(240))
    ys, xs = np.divmod(order[:64], 12)
    assert set(ys) == set(range(8)) and set(xs) == set(range(8))   # first block = first tile


def test_pisa_beats_keep_or_drop_on_the_structured_problem():
    rows = demo.run(side=24, heads=2, head_dim=64, densities=(0.25,), print_fn=lambda *_: None)
    err = {r["method"]: r["error"] for r in rows}
    assert err["dense"] < 1e-6
    assert err["PISA order 1"] < 0.5 * err["keep-or-drop"]
    assert err["PISA order 0"] < 0.5 * err["keep-or-drop"]


def test_demo_command_prints_a_table_and_plots(capsys, tmp_path):
    png = tmp_path / "errors.png"
    assert cli.main(["demo", "--side", "16", "--heads", "1", "--densities", "0.25,0.5",
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "keep-or-drop" in out and "rel. error vs dense" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_command_refuses_bad_densities(capsys):
    import pytest
    with pytest.raises(SystemExit):
        cli.main(["demo", "--densities", "0.1,2"])
    assert "expected numbers in (0, 1], got '0.1,2'" in capsys.readouterr().err
