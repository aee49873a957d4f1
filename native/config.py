"""The one place where numba is configured and the kernel backend is chosen.

- numba's compile cache goes to `cache_dir() / "numba"` (NUMBA_CACHE_DIR, unless the user set it), so the
  kernels compile once per machine and later processes load them from disk.
- EDGERUN_NO_JIT=1 selects the NumPy reference kernels without importing numba.
- If numba cannot be imported or the kernels fail to compile, edgerun falls back to the NumPy
  references and says why in one warning.
- Whether one-token q4 products may use 8-bit integer dot products (int_dot): only on CPUs with AVX-512
  VNNI, unless EDGERUN_NO_INT_DOT=1 keeps the float kernel.
- The number of threads the kernels use (set_threads; by default numba's pool size, the CPU count).
"""

from __future__ import annotations

import os
import sys
import warnings
from types import ModuleType

from ..paths import cache_dir

NO_JIT_ENV = "EDGERUN_NO_JIT"
NO_INT_DOT_ENV = "EDGERUN_NO_INT_DOT"

_threads = 0  # 0: not set, numba's default


def jit_disabled() -> bool:
    """True when EDGERUN_NO_JIT asks for the NumPy kernels."""
    return _env_flag(NO_JIT_ENV)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def int_dot() -> bool:
    """True when the q4 GEMV may quantize x to int8 and use AVX-512 VNNI dot products: numba compiles for
    this CPU (no NUMBA_CPU_NAME), which has them, and EDGERUN_NO_INT_DOT is unset."""
    if _env_flag(NO_INT_DOT_ENV) or os.environ.get("NUMBA_CPU_NAME"):
        return False
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    return all(features.get(f, False) for f in ("avx512f", "avx512bw", "avx512vnni", "f16c"))


def permvar() -> bool:
    """True when a vector of 16 table lookups may be one AVX-512 permute (the MXFP4 kernels): numba compiles for
    this CPU, which has AVX-512F. Elsewhere the lookups are made lane by lane."""
    if os.environ.get("NUMBA_CPU_NAME"):
        return False
    from llvmlite import binding

    return bool(binding.get_host_cpu_features().get("avx512f", False))


def configure_numba() -> None:
    """Point numba's compile cache at edgerun's cache dir unless NUMBA_CACHE_DIR is set already."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    path = str(cache_dir() / "numba")
    os.environ["NUMBA_CACHE_DIR"] = path
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before us: it has read its environment already
        numba.config.CACHE_DIR = path


def load_kernels() -> ModuleType | None:
    """The numba kernels module, or None for the NumPy fallback (EDGERUN_NO_JIT, or numba unusable)."""
    if jit_disabled():
        return None
    configure_numba()
    try:
        from . import kernels
    except Exception as e:  # numba missing, or an llvmlite/numba combination that cannot build them
        fall_back(e)
        return None
    return kernels


def fall_back(reason: BaseException) -> None:
    """Warn once that the JIT kernels are unusable, and why."""
    warnings.warn(f"edgerun: JIT kernels unavailable ({type(reason).__name__}: {reason}); "
                  "using the NumPy reference kernels, which are much slower", RuntimeWarning, stacklevel=3)


def set_threads(n: int) -> None:
    """Use n threads in the kernels (capped at the size of numba's thread pool)."""
    global _threads
    if int(n) < 1:
        raise ValueError(f"the number of threads must be at least 1; got {n}")
    _threads = int(n)


def threads(pool_size: int) -> int:
    """The number of threads to run on, given the size of the thread pool."""
    return min(_threads, pool_size) if _threads else pool_size
