"""The demo's structured problem, tile-major order, and the `pisa-jax demo` command."""

from __future__ import annotations

import os

import numpy as np
import pytest

import pisa_jax
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


@pytest.mark.parametrize("args,message", [
    (["--densities", "0.1,2"], "argument --densities: expected comma-separated numbers in "
                               "(0, 1], got '0.1,2'"),
    (["--densities", "0.1,"], "argument --densities: expected comma-separated numbers"),
    (["--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["--side", "4"], "argument --side: expected an integer >= 8, got '4'"),
    (["--heads", "0"], "argument --heads: expected an integer >= 1, got '0'"),
])
def test_demo_command_refuses_bad_arguments_with_its_own_usage(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert err.startswith("usage: pisa-jax demo")        # the subcommand's usage, not the top


def test_demo_plot_into_an_unwritable_place_is_refused_before_the_demo_runs(
        capsys, tmp_path, monkeypatch):
    from pisa_jax import demo as demo_mod
    monkeypatch.setattr(demo_mod, "run", lambda **kw: pytest.fail("the demo ran"))
    for target, message in ((tmp_path / "no" / "e.png", "no folder"),
                            (tmp_path, "is a folder, expected a file name")):
        with pytest.raises(SystemExit):
            cli.main(["demo", "--plot", str(target)])
        assert message in capsys.readouterr().err
    locked = str(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: False if os.fspath(p) == locked
                        else real_access(p, m, **kw))
    with pytest.raises(SystemExit):
        cli.main(["demo", "--plot", str(tmp_path / "e.png")])
    assert "argument --plot: cannot write" in capsys.readouterr().err


def test_help_describes_every_option_and_version_is_printed(capsys):
    import argparse
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("demo", "convert"):
        actions = [a for a in sub.choices[command]._actions if a.dest != "help"]
        assert len(actions) >= 4
        for action in actions:
            assert action.help, f"pisa-jax {command}: {action.dest} has no help"
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert all(action.help.split("(")[0].split()[0] in text for action in actions)
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"pisa-jax {pisa_jax.__version__}"


def test_demo_prints_rows_as_they_come_and_explains_the_columns(monkeypatch):
    timed, seen = [], []
    real = demo.time_per_call
    monkeypatch.setattr(demo, "time_per_call", lambda *a, **kw: timed.append(1) or real(*a, **kw))
    rows = demo.run(side=16, heads=1, densities=(0.001,),
                    print_fn=lambda s: seen.append((s, len(timed))))
    text = [s for s, _ in seen]
    assert any("density: fraction of key blocks" in s for s in text)
    assert any("ms/call: median time" in s for s in text)
    assert seen[0][1] == 0                         # the header comes before any work
    table = [(s, n) for s, n in seen if s.startswith(("dense ", "PISA order", "keep-or-drop"))]
    assert len(table) == len(rows) == 4
    assert [n for _, n in table] == [1, 2, 3, 4]   # each row printed once it is measured
    assert table[1][0].split()[3] == "0.001"       # not rounded to 0.00


@pytest.mark.parametrize("kwargs, message", [
    (dict(reps=0), "reps must be an integer >= 1"),
    (dict(target_s=-1.0), "target_s must be a number >= 0")])
def test_time_per_call_refuses_bad_options_before_calling(kwargs, message):
    from pisa_jax.metrics import time_per_call
    calls = []
    with pytest.raises(ValueError, match=message):
        time_per_call(lambda: calls.append(1), **kwargs)
    assert calls == []
