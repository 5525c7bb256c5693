"""Progress in logs and CI: a non-terminal stderr gets a bar line every 15 s, not one per step."""

from __future__ import annotations

import io
import re

import pytest

from synthfactory.progress import progress_bar


def _lines(text: str) -> list[str]:
    return [s for s in re.split(r"[\r\n]+", text) if s.strip()]


def test_a_log_gets_a_few_lines_per_stage_even_when_every_step_sets_a_postfix(monkeypatch) -> None:
    """The training loops set the loss as a postfix on every step; tqdm's own `set_postfix`
    redraws at once, which wrote one line per step into `make demo > log`."""
    err = io.StringIO()  # not a TTY, as a log file or a CI runner
    monkeypatch.setattr("sys.stderr", err)
    with progress_bar(2000, "train", "step") as bar:
        for step in range(2000):
            bar.update(1)
            bar.set_postfix(batch=512, loss=f"{1 / (step + 1):.4f}")
    lines = _lines(err.getvalue())
    assert 1 <= len(lines) <= 4, lines[:6]
    assert "loss=" in lines[-1] and "2000/2000" in lines[-1]


def test_a_terminal_gets_a_live_bar(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr("sys.stderr", err)
    bar = progress_bar(10, "sample", "img")
    assert bar.mininterval == pytest.approx(0.1)
    bar.close()


def test_a_run_in_a_log_writes_a_few_progress_lines_per_stage(tmp_path) -> None:
    """The whole CLI as CI meets it (stderr not a terminal), on the tiny recipe with 40 DP steps
    (a `--smoke` run takes 2, too few to show a line per step)."""
    from collections import Counter

    from conftest import tiny_recipe, write_recipe
    from typer.testing import CliRunner

    from synthfactory.cli import app

    path = write_recipe(tmp_path / "r", tiny_recipe(training__steps=40))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "runs"),
                                   "--audit-dir", str(tmp_path / "pa")])  # fmt: skip
    assert res.exit_code == 0, res.output
    bars = [ln for ln in _lines(res.stderr) if "|" in ln and ":" in ln]
    per_stage = Counter(ln.split(":")[0].strip() for ln in bars)
    assert per_stage and max(per_stage.values()) <= 4, per_stage
