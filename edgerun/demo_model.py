"""The embedded default model: a small Mixtral-architecture MoE with fixed random weights and the real
Mixtral tokenizer, built once into the user cache dir. It exercises the whole runtime without a download;
its text is meaningless because its weights are random."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .paths import cache_dir

NAME = "random-mixtral-v1"
SEED = 20240317
CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "rope_theta": 1e6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float16",
}
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
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=NAME + ".", dir=target.parent))
    try:
        _write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write(path: Path) -> None:
    c = CONFIG
    g = torch.Generator().manual_seed(SEED)
    D, I, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    Dh = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * Dh

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).half()

    tensors = {"model.embed_tokens.weight": rand(V, D), "lm_head.weight": rand(V, D),
               "model.norm.weight": torch.ones(D, dtype=torch.float16)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(D, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(D, dtype=torch.float16),
            p + "self_attn.q_proj.weight": rand(D, D), p + "self_attn.k_proj.weight": rand(kv, D),
            p + "self_attn.v_proj.weight": rand(kv, D), p + "self_attn.o_proj.weight": rand(D, D),
            p + "block_sparse_moe.gate.weight": rand(E, D),
        })
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors.update({q + "w1.weight": rand(I, D), q + "w3.weight": rand(I, D), q + "w2.weight": rand(D, I)})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    with resources.as_file(resources.files("edgerun") / "data" / "mixtral-tokenizer.model") as src:
        shutil.copyfile(src, path / "tokenizer.model")
