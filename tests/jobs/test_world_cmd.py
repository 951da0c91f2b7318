"""`tokenfactory world` through the real command line entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.main import build_parser, main
from factory.catalogs import read_world_catalog


def test_world_command_writes_a_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cat"
    rc = main(
        [
            "world",
            "--out",
            str(out),
            "--seed",
            "4",
            "--products",
            "3",
            "--shots",
            "2",
            "--heldout",
            "1",
            "--contexts",
            "2",
            "--distractors",
            "2",
            "--size",
            "24",
            "--categories",
            "bag",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "3 in 1 groups" in printed
    cat = read_world_catalog(str(out))
    assert [c.parent for c in cat.concepts] == ["bag"] * 3
    assert cat.manifest.extra["size"] == 24 and len(cat.queries) == 6


def test_world_command_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["world", "--out", str(tmp_path), "--seed", "1", "--contexts", "9"]) == 2
    assert "contexts must be between 1 and 6" in capsys.readouterr().err


def test_every_flag_is_documented() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    world = sub.choices["world"]
    for action in world._actions:
        assert action.help, action.option_strings
