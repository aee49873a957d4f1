"""The embedded default model: a small Mixtral-architecture MoE trained on Tiny Shakespeare by
training/train_demo.py, shipped inside the package in Hugging Face format (edgerun/data/demo-model)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelNotFoundError

NAME = "demo-model"
USER, ASSISTANT = "ROMEO", "JULIET"  # the speakers the chat template gives the user and the model


def demo_model_dir() -> Path:
    """The packaged demo model's directory."""
    path = Path(__file__).resolve().parent / "data" / NAME
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"the demo model is missing from {path}; reinstall edgerun")
    return path


def describe(path: Path | None = None) -> str:
    """One line on what the demo model is, from its config.json and metrics.json."""
    path = path or demo_model_dir()
    cfg = json.loads((path / "config.json").read_text())
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    size = f"{metrics['parameters'] / 1e6:.1f}M-parameter " if "parameters" in metrics else ""
    ppl = metrics.get("heldout_perplexity", {}).get("edgerun_float")
    trained = f" (held-out perplexity {ppl:.0f})" if ppl else ""
    return (f"a {size}Mixtral-architecture MoE ({cfg['num_local_experts']} experts, top-"
            f"{cfg['num_experts_per_tok']}, {cfg['num_hidden_layers']} layers) trained on Tiny Shakespeare"
            f"{trained}; you speak as {USER}, it answers as {ASSISTANT}")
