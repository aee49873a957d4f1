"""Sizes as people write them (`12GiB`, `1.5GB`, `800MiB`) and as edgerun prints them."""

from __future__ import annotations

import re

from .errors import ArgumentError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int | float, zero: bool = False) -> int:
    """Bytes from a human size: 12GiB, 1.5GB, 800MiB, 4096 (bytes). Decimal units are powers of 10. zero: 0 is
    allowed (it turns something off)."""
    if zero and str(text).strip() in ("0", "0.0"):
        return 0
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ArgumentError(f"a size must be positive, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ArgumentError(f"cannot read {text!r} as a size: write it like 12GiB, 1.5GB or 800MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: float) -> str:
    """A byte count in the largest binary unit it reaches: 1.50 GiB, 440.44 MiB, 12.00 KiB, 512 B."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
