"""Random-weight Mixtral-architecture checkpoints of any size, for tests and benchmarks.

Tensors are generated and written one layer per safetensors shard, so memory stays bounded by one layer
however large the model. Run `python -m edgerun.synthetic DST --hidden 1024 --layers 8 ...`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from .units import format_size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixtral_config(hidden: int, layers: int, experts: int, inter: int, vocab: int = 32000, heads: int = 8,
                   kv_heads: int = 4, top_k: int = 2, context: int = 4096, dtype: str = "bfloat16") -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "max_position_embeddings": context, "rope_theta": 1e6, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
    }


def write_random_mixtral(path: str | Path, config: dict, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Write config.json, sharded model-*.safetensors with an index, and the Mixtral tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = config
    dtype = _DTYPES[c["torch_dtype"]]
    g = torch.Generator().manual_seed(seed)
    D, I, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    Dh = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * Dh

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * (scale * shape[-1] ** -0.5)).to(dtype)

    # Token embeddings of unit RMS (what the first norm expects) and residual branches scaled down by depth,
    # as trained models have them: otherwise attention outputs, nearly the same for every token, outweigh the
    # token and the routers send most tokens to the same experts.
    branch = (2 * c["num_hidden_layers"]) ** -0.5

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    def shards():
        yield {"model.embed_tokens.weight": rand(V, D, scale=D ** 0.5)}
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            layer = {p + "input_layernorm.weight": ones(D), p + "post_attention_layernorm.weight": ones(D),
                     p + "self_attn.q_proj.weight": rand(D, D), p + "self_attn.k_proj.weight": rand(kv, D),
                     p + "self_attn.v_proj.weight": rand(kv, D),
                     p + "self_attn.o_proj.weight": rand(D, D, scale=branch),
                     p + "block_sparse_moe.gate.weight": rand(E, D)}
            for e in range(E):
                q = f"{p}block_sparse_moe.experts.{e}."
                layer.update({q + "w1.weight": rand(I, D), q + "w3.weight": rand(I, D),
                              q + "w2.weight": rand(D, I, scale=branch)})
            yield layer
        yield {"model.norm.weight": ones(D), "lm_head.weight": rand(V, D)}

    weight_map, total = {}, 0
    n = c["num_hidden_layers"] + 2
    for k, tensors in enumerate(shards()):  # one shard in memory at a time
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        for t_name, t in tensors.items():
            weight_map[t_name] = name
            total += t.nbytes
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(c, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    if with_tokenizer:
        with resources.as_file(resources.files("edgerun") / "data" / "mixtral-tokenizer.model") as src:
            shutil.copyfile(src, path / "tokenizer.model")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgerun.synthetic", description=__doc__)
    p.add_argument("dst")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--inter", type=int, default=2048, help="expert width")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = mixtral_config(a.hidden, a.layers, a.experts, a.inter, a.vocab, a.heads, a.kv_heads, dtype=a.dtype)
    path = write_random_mixtral(a.dst, cfg, a.seed)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{path}: {format_size(size)} of random weights")


if __name__ == "__main__":
    main()
