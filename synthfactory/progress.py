"""Progress bars (tqdm): live on a terminal, a line every 15 s in logs and CI."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class _Bar(tqdm):
    """tqdm whose postfix waits for the next timed refresh: tqdm's own `set_postfix` redraws the
    bar at once, which in a log is one line per training step whatever `mininterval` says."""

    def set_postfix(self, ordered_dict=None, refresh: bool = False, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    live = sys.stderr.isatty()
    return _Bar(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        mininterval=0.1 if live else 15.0,
        dynamic_ncols=live,
    )
