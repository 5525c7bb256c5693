"""Progress bars (tqdm): live on a terminal, a line every 15 s in logs and CI."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    live = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        mininterval=0.1 if live else 15.0,
        dynamic_ncols=live,
    )
