"""Random-weight checkpoints of any size, for tests and benchmarks: the Mixtral architecture in the usual HF
layout, Grok-2 in the layout of xai-org's release (tensor-parallel shards, `tokenizer.tok.json`), or Grok-1 in
the layout of xai-org's JAX release (`ckpt-0/` of pickled 8-bit weights; needs ml_dtypes).

Mixtral tensors are generated and written one layer per safetensors shard, so memory stays bounded by one layer
however large the model; a Grok-2 release holds one tensor family of every layer per file, so memory is bounded
by the largest family; a Grok-1 release, by one parameter (the largest: a layer's stack of expert matrices).
Run `python -m edgerun.synthetic DST [--family grok-2|grok-1] --hidden 1024 --layers 8 ...`.
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


def _random_matrices(dtype: torch.dtype, seed: int):
    """rand(*shape, scale=1): seeded Gaussian weights of RMS scale / sqrt(fan-in), in dtype."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * (scale * shape[-1] ** -0.5)).to(dtype)
    return rand


def write_random_mixtral(path: str | Path, config: dict, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """Write config.json, sharded model-*.safetensors with an index, and the Mixtral tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = config
    dtype = _DTYPES[c["torch_dtype"]]
    rand = _random_matrices(dtype, seed)
    D, I, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    Dh = D // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * Dh

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
        _copy_mixtral_tokenizer(path)
    return path


def _copy_mixtral_tokenizer(path: Path) -> None:
    """The packaged Mixtral tokenizer.model, into path."""
    with resources.as_file(resources.files("edgerun") / "data" / "mixtral-tokenizer.model") as src:
        shutil.copyfile(src, path / "tokenizer.model")


def grok2_config(hidden: int, layers: int, experts: int, inter: int, dense_inter: int, vocab: int = 32768,
                 heads: int = 8, kv_heads: int = 2, top_k: int = 2, context: int = 8192,
                 dtype: str = "bfloat16") -> dict:
    """A Grok-2 config.json as the release writes it, at other sizes (head dim 128 where the hidden size allows)."""
    return {
        "architectures": ["Grok1ForCausalLM"], "model_type": "git", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": dense_inter, "moe_intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "num_local_experts": experts, "num_experts_per_tok": top_k, "residual_moe": True, "rms_norm_eps": 1e-5,
        "max_position_embeddings": context, "embedding_multiplier_scale": hidden ** 0.5,
        "output_multiplier_scale": 0.5, "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
        "final_logit_softcapping": 50.0, "attn_temperature_len": 1024, "rope_theta": 208533496,
        "rope_type": "original", "original_max_position_embeddings": 8192, "scaling_factor": 16.0,
        "sliding_window_size": -1, "global_attn_every_n": 1, "torch_dtype": dtype,
    }


# the release's files: one tensor family of every layer per "TP-common" file; rank files 6, 7, 8 hold the w1, w2,
# w3 slices of every expert (w1, w3 split along dim 0, w2 along dim 1)
_GROK2_FILES = ["embed", "lm_head", "norm", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj", "w1", "w2", "w3",
                "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj", "pre_attn_norm",
                "post_attn_norm", "pre_moe_norm", "post_moe_norm", "block_sparse_moe.gate"]


def write_random_grok2(path: str | Path, config: dict, seed: int = 0, ranks: int = 8) -> Path:
    """Write config.json, the release's `pytorch_model-000NN-TP-*.safetensors` files and a byte-level
    tokenizer.tok.json (the three named special tokens, then the 256 bytes)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = config
    dtype = _DTYPES[c["torch_dtype"]]
    rand = _random_matrices(dtype, seed)
    D, V, E, L = c["hidden_size"], c["vocab_size"], c["num_local_experts"], c["num_hidden_layers"]
    I, Id, Dh = c["moe_intermediate_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * Dh, c["num_key_value_heads"] * Dh
    if I % ranks:
        raise ValueError(f"the expert width {I} does not split into {ranks} ranks")
    branch = (2 * L) ** -0.5

    def layer(i: int, name: str) -> torch.Tensor:
        shapes = {"mlp.gate_proj": (Id, D), "mlp.up_proj": (Id, D), "mlp.down_proj": (D, Id),
                  "self_attn.q_proj": (q, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
                  "self_attn.o_proj": (D, q), "block_sparse_moe.gate": (E, D)}
        if name in shapes:
            return rand(*shapes[name], scale=branch if name.endswith(("down_proj", "o_proj")) else 1.0)
        return torch.ones(D, dtype=dtype)  # the four norms

    for number, family in enumerate(_GROK2_FILES):
        prefix = f"pytorch_model-{number:05d}-TP-"
        if family in ("w1", "w2", "w3"):  # every expert of every layer, sliced by rank
            dim = 1 if family == "w2" else 0
            slices: list[dict] = [{} for _ in range(ranks)]
            for i in range(L):
                for e in range(E):
                    full = rand(D, I, scale=branch) if family == "w2" else rand(I, D)
                    for r, piece in enumerate(full.chunk(ranks, dim=dim)):
                        slices[r][f"model.layers.{i}.block_sparse_moe.experts.{e}.{family}.weight"] = piece.contiguous()
            for r, tensors in enumerate(slices):
                save_file(tensors, str(path / f"{prefix}{r:03d}.safetensors"), metadata={"format": "pt"})
            continue
        if family in ("embed", "lm_head", "norm"):
            name = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight", "norm": "model.norm.weight"}
            tensors = {name[family]: torch.ones(D, dtype=dtype) if family == "norm" else rand(V, D)}
        else:
            tensors = {f"model.layers.{i}.{family}.weight": layer(i, family) for i in range(L)}
        save_file(tensors, str(path / f"{prefix}common.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(c, indent=2))
    specials = ["<|pad|>", "<|separator|>", "<|eos|>"]
    table = {"special_tokens": [{"bytes": list(s.encode()), "token": i} for i, s in enumerate(specials)],
             "regular_tokens": [{"bytes": [b], "token": len(specials) + b} for b in range(256)],
             "word_split": "V1", "vocab_size": len(specials) + 256}
    (path / "tokenizer.tok.json").write_text(json.dumps(table))
    return path


def write_random_grok1_release(path: str | Path, config, seed: int = 0, blocks: int = 8) -> Path:
    """Write ckpt-0/ as xai-org's release holds it for a Grok1Config (grok1_config.json beside it unless the sizes
    are the released ones), with random int8 weights and bfloat16 scales (blocks of input rows for the attention
    output and the experts' down matrices, as released), and the packaged Mixtral tokenizer.model standing in for
    Grok-1's."""
    import pickle
    import sys

    import ml_dtypes
    import numpy as np

    from .checkpoint.grok1_release import CKPT, CONFIG_FILE, RELEASED, parameters

    path = Path(path)
    (path / CKPT).mkdir(parents=True)
    sys.modules["__main__"].QuantizedWeight8bit = _QuantizedWeight8bit  # as the release's checkpoint.py does
    rng = np.random.default_rng(seed)
    for i, param in enumerate(parameters(config)):
        if param.quantized:
            *lead, rows, cols = param.shape
            b = blocks if param.path.endswith(("linear_1/w", "attention/linear/w")) else 1
            weight = rng.integers(-127, 128, size=param.shape, dtype=np.int8)
            # uniform int8 has an RMS of 73: scales give the matrix an RMS of 1 / sqrt(fan-in)
            scales = np.full((*lead, b, cols), 1 / (73 * rows ** 0.5), dtype=np.float32).astype(ml_dtypes.bfloat16)
            leaf = _QuantizedWeight8bit(weight, scales)
        elif len(param.shape) == 1:
            leaf = np.ones(param.shape, dtype=np.float32)  # norm scales
        else:
            leaf = rng.standard_normal(param.shape, dtype=np.float32) * param.shape[0] ** -0.5
        with open(path / CKPT / f"tensor{i:05d}_000", "wb") as f:
            pickle.dump(leaf, f, protocol=4)
        del leaf
    if config != RELEASED:
        (path / CONFIG_FILE).write_text(json.dumps(config.official_config(), indent=1))
    _copy_mixtral_tokenizer(path)
    return path


class _QuantizedWeight8bit:
    """Pickles as the release's `__main__.QuantizedWeight8bit` (its state: weight and scales)."""

    __module__ = "__main__"
    __qualname__ = "QuantizedWeight8bit"

    def __init__(self, weight, scales):
        self.weight, self.scales = weight, scales


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m edgerun.synthetic", description=__doc__)
    p.add_argument("dst")
    p.add_argument("--family", default="mixtral", choices=["mixtral", "grok-2", "grok-1"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--inter", type=int, default=2048, help="expert width")
    p.add_argument("--dense-inter", type=int, default=None, help="Grok-2's residual MLP width (default 2 x --inter)")
    p.add_argument("--ranks", type=int, default=8, help="Grok-2's tensor-parallel rank files (default 8)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.family == "grok-1":
        from .checkpoint.grok1_release import Grok1Config

        widening = a.inter * 3 / 2 / a.hidden  # model.py's ffn_size gives back --inter (a multiple of 8)
        cfg1 = Grok1Config(vocab_size=a.vocab, emb_size=a.hidden, key_size=a.hidden // a.heads, num_q_heads=a.heads,
                           num_kv_heads=a.kv_heads, num_layers=a.layers, widening_factor=widening,
                           num_experts=a.experts)
        path = write_random_grok1_release(a.dst, cfg1, a.seed)
        size = sum(f.stat().st_size for f in (path / "ckpt-0").iterdir())
        print(f"{path}: {format_size(size)} of random weights")
        return
    if a.family == "grok-2":
        cfg = grok2_config(a.hidden, a.layers, a.experts, a.inter, a.dense_inter or 2 * a.inter, a.vocab, a.heads,
                           a.kv_heads, dtype=a.dtype)
        path = write_random_grok2(a.dst, cfg, a.seed, a.ranks)
    else:
        cfg = mixtral_config(a.hidden, a.layers, a.experts, a.inter, a.vocab, a.heads, a.kv_heads, dtype=a.dtype)
        path = write_random_mixtral(a.dst, cfg, a.seed)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{path}: {format_size(size)} of random weights")


if __name__ == "__main__":
    main()
