import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# compiled kernels are cached beside the test cache, not in the user's edgerun cache
os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "numba"))


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(autouse=True)
def _no_gpu_unless_marked(request, monkeypatch):
    """Tests see the machine CI has, without a GPU, so a default load stays on the CPU in float32 (the references
    they compare with are built that way); a test marked `cuda` sees the GPU."""
    if "cuda" not in request.keywords:
        monkeypatch.setattr("edgerun.hw.profile.gpu_device", lambda: None)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # edgerun's own cache (demo model, ...) goes to a temporary dir, never the user's
    monkeypatch.setenv("EDGERUN_CACHE", str(tmp_path_factory.getbasetemp() / "edgerun-cache"))
    # and a known hardware profile stands for this machine's, so no test measures one or reads the user's
    config = tmp_path_factory.getbasetemp() / "edgerun-config"
    monkeypatch.setenv("EDGERUN_CONFIG", str(config))
    local = config / "profiles" / f"{socket.gethostname()}.json"
    if not local.exists():
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).parent.parent / "profiles" / "cloud-vm-2core-epyc.json", local)
