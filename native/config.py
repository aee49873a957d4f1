"""The one place where numba is configured and the kernel backend is chosen.

- numba's compile cache goes to `cache_dir() / "numba"` (NUMBA_CACHE_DIR, unless the user set it), so the
  kernels compile once per machine and later processes load them from disk; that once, a child process compiles
  them (compile_apart), so that the compiler's memory never counts in a process's RAM budget.
- EDGERUN_NO_JIT=1 selects the NumPy reference kernels without importing numba.
- If numba cannot be imported or the kernels fail to compile, edgerun falls back to the NumPy
  references and says why in one warning.
- Whether one-token q4 products may use 8-bit integer dot products (int_dot): only on CPUs with AVX-512
  VNNI, unless EDGERUN_NO_INT_DOT=1 keeps the float kernel.
- The number of threads the kernels use (set_threads; by default numba's pool size, the CPU count).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

from ..paths import cache_dir

NO_JIT_ENV = "EDGERUN_NO_JIT"
NO_INT_DOT_ENV = "EDGERUN_NO_INT_DOT"
COMPILING_ENV = "EDGERUN_COMPILING"  # set in the child process that compiles the kernels

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


def compiled_marker(what: str) -> Path:
    """A file in numba's compile cache saying that compiling `what` ("kernels", or a variant such as "routed-q4-2"
    or "layers-int8-uint8") finished there for these kernels, this numba and this Python: later processes load it
    from the cache."""
    import llvmlite
    import numba

    from . import kernels  # only once load_kernels has succeeded

    source = os.stat(kernels.__file__)
    key = (f"{source.st_mtime_ns}-{source.st_size}-numba{numba.__version__}-llvmlite{llvmlite.__version__}-"
           f"py{sys.version_info.major}.{sys.version_info.minor}")
    return Path(os.environ.get("NUMBA_CACHE_DIR") or cache_dir() / "numba") / f"edgerun-{what}-{key}.done"


def compile_apart(what: str, code: str) -> None:
    """Run `code` (Python that compiles `what` into the disk cache) in a child process, the first time on this
    machine: compiling the kernels takes some 300 MB more than loading them, which would otherwise stay in this
    process and count against its RAM budget on the first run only. Nothing is done when `what` was compiled
    before (or in that child); a failure is left to the warmup that follows here, which compiles it itself or
    falls back to NumPy."""
    if os.environ.get(COMPILING_ENV) or compiled_marker(what).exists():
        return
    try:
        subprocess.run([sys.executable, "-c", "import numpy as np\nfrom edgerun import native\n" + code],
                       env={**os.environ, COMPILING_ENV: "1"}, capture_output=True)
    except OSError:  # no interpreter to start: compiled here, as before
        pass


def mark_compiled(what: str) -> None:
    """Record that `what` is in the compile cache (see compiled_marker)."""
    marker = compiled_marker(what)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache: the next process compiles apart again, and loads what numba cached
        pass


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
