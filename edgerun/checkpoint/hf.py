"""Finding a model: a local HF directory, or a repo id resolved through the local HF cache (downloaded when
the network allows), and reading its JSON files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError, ModelNotFoundError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def resolve_model_dir(name: str | Path) -> Path:
    """A directory holding config.json, from a path or a Hugging Face repo id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; give the model's directory (with config.json)")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
        return path
    if _REPO_ID.match(str(name)):
        return _from_hub(str(name))
    raise ModelNotFoundError(f"no such model directory: {path}")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except Exception as e:
        raise ModelNotFoundError(
            f"{repo_id} is not a local directory, not in the Hugging Face cache, and could not be downloaded "
            f"({type(e).__name__})"
        ) from None


def read_json(path: Path, required: bool = True) -> dict:
    """A JSON object from a file; {} when an optional file is absent."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"missing {path}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data
