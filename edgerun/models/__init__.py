"""Model families, one module each, named after the HF `model_type` they read.

A family module provides ARCHITECTURES, RULES (checkpoint name -> canonical name), a ModelArgs dataclass
with HF field names, and `to_spec(args, config) -> ModelSpec`; optionally `claims(config) -> bool`, for
families that share an architecture name and are told apart by what their config holds (Grok-1 and Grok-2),
and TP_SPLIT, for checkpoints whose tensors are split across tensor-parallel rank files.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from ..errors import CheckpointError, UnsupportedModelError
from . import deepseek, glm4_moe, gpt_oss, grok, grok2, mixtral, olmoe, qwen2_moe, qwen3_moe
from .spec import ModelSpec

FAMILIES: dict[str, ModuleType] = {
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "qwen3_moe": qwen3_moe,
    "olmoe": olmoe,
    "grok-1": grok,
    "grok-2": grok2,
    "deepseek_v2": deepseek,
    "deepseek_v3": deepseek,
    "glm4_moe": glm4_moe,
    "gpt_oss": gpt_oss,
}
_ALIASES = {"grok1": "grok-1", "grok": "grok-1", "grok2": "grok-2"}


def _claims(family: ModuleType, cfg: dict) -> bool:
    claims = getattr(family, "claims", None)
    return claims is None or claims(cfg)


def family_of(cfg: dict, source: str = "config.json") -> ModuleType:
    """The family module for a config dict: by model_type, else by architectures; where families share an
    architecture name, the one whose `claims` recognises the config's keys."""
    model_type = cfg.get("model_type")
    model_type = _ALIASES.get(model_type, model_type)
    family = FAMILIES.get(model_type)
    if family is not None and _claims(family, cfg):
        return family
    archs = cfg.get("architectures") or []
    families = list(dict.fromkeys(FAMILIES.values()))  # a module may serve several model types
    matches = [f for f in families if any(a in f.ARCHITECTURES for a in archs) and _claims(f, cfg)]
    if len(matches) == 1:
        return matches[0]
    named = model_type or ", ".join(archs) or "no model_type"
    raise UnsupportedModelError(
        f"{source}: architecture {named!r} is not supported (supported: {', '.join(FAMILIES)})"
    )


def spec_from_config(cfg: dict, source: str = "config.json") -> tuple[ModuleType, ModelSpec]:
    family = family_of(cfg, source)
    names = {f.name for f in dataclasses.fields(family.ModelArgs)}
    try:
        args = family.ModelArgs(**{k: v for k, v in cfg.items() if k in names})
        spec = family.to_spec(args, cfg)
    except TypeError as e:
        missing = str(e).split("argument", 1)[-1].strip(": ")
        raise CheckpointError(f"{source} lacks required field(s) {missing}") from None
    except (KeyError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{source} has an invalid value ({type(e).__name__}: {e})") from None
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{source}: {e}") from None
    _validate(spec, source)
    return family, spec


def _validate(spec: ModelSpec, source: str) -> None:
    problems = []
    if spec.num_heads % spec.num_kv_heads:
        problems.append(f"num_attention_heads {spec.num_heads} is not a multiple of num_key_value_heads "
                        f"{spec.num_kv_heads}")
    if spec.moe_layers and not 0 < spec.top_k <= spec.num_experts:
        problems.append(f"num_experts_per_tok {spec.top_k} must be between 1 and the number of experts "
                        f"{spec.num_experts}")
    if spec.head_dim % 2:
        problems.append(f"head_dim {spec.head_dim} must be even for rotary embeddings")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
