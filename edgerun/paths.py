"""Where edgerun keeps files of its own: the user cache dir, or $EDGERUN_CACHE when set."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def cache_dir() -> Path:
    return Path(os.environ.get("EDGERUN_CACHE") or user_cache_dir("edgerun", appauthor=False))
