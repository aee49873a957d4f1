"""The embedded default model: a small Mixtral-architecture MoE with fixed random weights and the real
Mixtral tokenizer, built once into the user cache dir. It exercises the whole runtime without a download;
its text is meaningless because its weights are random."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .paths import cache_dir
from .synthetic import mixtral_config, write_random_mixtral

NAME = "random-mixtral-v3"
SEED = 20240317
CONFIG = mixtral_config(hidden=256, layers=4, experts=8, inter=512, context=2048, dtype="float16")
# A Mixtral-style instruction format: <s>[INST] user [/INST] answer</s>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] {% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% elif m['role'] != 'system' %}{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}{% endfor %}"
)


def demo_model_dir() -> Path:
    """The demo model's directory, built on first use (about 60 MB, a few seconds)."""
    target = cache_dir() / "demo" / NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=NAME + ".", dir=target.parent))
    try:
        _write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write(path: Path) -> None:
    write_random_mixtral(path, CONFIG, seed=SEED)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
