"""`edgerun plan` for the large MoE models on every reference profile, as README rows, and the KV cache of the
models with multi-head latent attention against the full keys and values the same model would otherwise cache.

The configs in benchmarks/configs/ hold the published config.json values of each model (the figures that size it;
DeepSeek-V3 and Kimi-K2 as DeepSeek and Moonshot publish them, GLM-4.5-Air as Z.ai does, gpt-oss as OpenAI does).
Every prediction uses q4 experts, q8 dense matrices (q4 where q8 cannot fit, marked) and a 4096-token context.

    python benchmarks/plan_table.py [--ctx 4096] [--configs benchmarks/configs] [--profiles profiles]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgerun.hw.plan import predict
from edgerun.hw.profile import load_profile
from edgerun.models import spec_from_config
from edgerun.models.decoder import Decoder

HERE = Path(__file__).resolve().parent
GB = 1e9


def row(profile: str, model: str, pred, dense: str) -> str:
    if not pred.possible:
        return f"| `{profile}` | {model} | impossible: {pred.reason} | | | | | | |"
    slots = f"{pred.expert_slots} / {pred.gpu_expert_slots or '-'} of {pred.experts_total}"
    disk = pred.bytes_per_token.get("disk", 0) / GB
    name = model if dense == "q8" else f"{model} (q4 dense)"
    return (f"| `{profile}` | {name} | {pred.ram_budget_bytes / GB:.1f} GB | {slots} | {pred.hit_rate:.0%} | "
            f"{disk:.2f} GB | {pred.prefill_tokens_per_s:.1f} | {pred.decode_tokens_per_s:.2f} | {pred.bottleneck} |")


def latent_cache(config: dict, ctx: int) -> tuple[int, int] | None:
    """(bytes of the latent cache, bytes of full keys and values) in bfloat16 at ctx tokens, for an MLA model."""
    _, spec = spec_from_config(config)
    if not spec.kv_lora_rank:
        return None
    latent = Decoder(spec).cache_bytes(ctx, torch.bfloat16)
    full = spec.num_layers * ctx * spec.num_heads * (spec.qk_nope_head_dim + spec.rope.head_dim + spec.v_head_dim) * 2
    return latent, full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--configs", type=Path, default=HERE / "configs")
    p.add_argument("--profiles", type=Path, default=HERE.parent / "profiles")
    a = p.parse_args()
    configs = {path.stem: json.loads(path.read_text()) for path in sorted(a.configs.glob("*.json"))}
    print("| profile | model | RAM budget | expert slots | hit rate | disk per token | prefill tok/s | decode tok/s "
          "| bottleneck |")
    print("|---|---|---|---|---|---|---|---|---|")
    for profile_path in sorted(a.profiles.glob("*.json")):
        profile = load_profile(profile_path)
        for model, config in configs.items():
            pred = predict(config, profile, expert_format="q4", dense_format="q8", ctx=a.ctx)
            dense = "q8"
            if not pred.possible:
                q4 = predict(config, profile, expert_format="q4", dense_format="q4", ctx=a.ctx)
                if q4.possible:
                    pred, dense = q4, "q4"
            print(row(profile_path.name, model, pred, dense))
    print()
    for model, config in configs.items():
        sizes = latent_cache(config, a.ctx)
        if sizes:
            latent, full = sizes
            print(f"{model}: KV cache at {a.ctx} tokens (bfloat16) {latent / 2**20:.0f} MiB of latents, "
                  f"{full / 2**30:.1f} GiB as full keys and values: {full / latent:.0f}x smaller")


if __name__ == "__main__":
    main()
