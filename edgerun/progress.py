"""Progress bars for long work (loading, converting), shown on a terminal for work that takes a while."""

from __future__ import annotations

import sys

from tqdm import tqdm

MIN_BYTES_FOR_BAR = 512 * 2**20


class ByteProgress:
    """A context manager with update(nbytes); shows a bar with ETA only where it helps."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None):
        if enabled is None:
            enabled = total >= MIN_BYTES_FOR_BAR and sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=not enabled, leave=False)

    def update(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
