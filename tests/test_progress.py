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
