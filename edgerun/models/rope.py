"""Rotary position embeddings: the frequency schedules HF configs use, applied NeoX style (rotate_half).

A config names its schedule in `rope_parameters` (transformers v5) or `rope_theta` + `rope_scaling` (older
files). Supported: default, linear, dynamic (NTK), yarn, llama3. With `partial_rotary_factor` below 1 (GLM-4.5),
only the first head_dim * factor dims of each head rotate, with the frequencies of a head that size; the rest
pass through.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass
class RopeSpec:
    theta: float
    head_dim: int
    max_position_embeddings: int
    rope_type: str = "default"
    params: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict, head_dim: int, default_theta: float = 10000.0) -> "RopeSpec":
        params = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        params = {**legacy, **params}
        factor = params.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if not 0 < factor <= 1:
            raise UnsupportedModelError(f"partial_rotary_factor {factor} (expected a share of the head, 0 to 1)")
        head_dim = int(head_dim * factor)
        theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta
        rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
        if rope_type not in ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        return cls(float(theta), head_dim, int(cfg.get("max_position_embeddings") or 4096), rope_type, params)

    def key(self) -> tuple:
        """Identifies the schedule: attention parts with equal keys share one table."""
        return (self.theta, self.head_dim, self.max_position_embeddings, self.rope_type,
                tuple(sorted((k, repr(v)) for k, v in self.params.items())))


class Rope:
    """Cos/sin tables for positions, computed for a whole context once (dynamic NTK: per call), in float32 on the
    CPU, then kept on `device`."""

    def __init__(self, spec: RopeSpec, context_length: int, device: torch.device | str = "cpu"):
        self.spec, self.device = spec, torch.device(device)
        self.inv_freq, self.scale = self._frequencies(spec, seq_len=None)
        self._table_len = 0
        self._cos = self._sin = None
        if spec.rope_type != "dynamic":
            self._build_table(context_length)

    @staticmethod
    def _frequencies(spec: RopeSpec, seq_len: int | None) -> tuple[torch.Tensor, float]:
        d, base, p = spec.head_dim, spec.theta, spec.params
        exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        inv_freq = 1.0 / (base**exponents)
        if spec.rope_type == "linear":
            return inv_freq / p["factor"], 1.0
        if spec.rope_type == "dynamic":
            # NTK-aware: the base grows once the sequence outgrows the trained length.
            orig = spec.max_position_embeddings
            n = max(seq_len or orig, orig)
            factor = p["factor"]
            base = base * ((factor * n / orig) - (factor - 1)) ** (d / (d - 2))
            return 1.0 / (base**exponents), 1.0
        if spec.rope_type == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old_len = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            blended = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
            return torch.where(medium, blended, scaled), 1.0
        if spec.rope_type == "yarn":
            return _yarn(spec, inv_freq)
        return inv_freq, 1.0

    def _build_table(self, n: int) -> None:
        pos = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        self._cos, self._sin = (freqs.cos() * self.scale).to(self.device), (freqs.sin() * self.scale).to(self.device)
        self._table_len = n

    def cos_sin(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin for positions start..start+length-1, each [length, head_dim/2]."""
        end = start + length
        if self.spec.rope_type == "dynamic":
            inv_freq, _ = self._frequencies(self.spec, seq_len=end)
            freqs = torch.outer(torch.arange(start, end, dtype=torch.float32), inv_freq)
            return freqs.cos().to(self.device, dtype), freqs.sin().to(self.device, dtype)
        if end > self._table_len:
            self._build_table(max(end, 2 * self._table_len))
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)


def _yarn(spec: RopeSpec, inv_freq_extra: torch.Tensor) -> tuple[torch.Tensor, float]:
    d, base, p = spec.head_dim, spec.theta, spec.params
    orig = p.get("original_max_position_embeddings") or spec.max_position_embeddings
    factor = p.get("factor") or spec.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attn_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def dim_for(rotations: float) -> float:
        # the dimension whose wavelength completes `rotations` turns over the original context
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq_extra / factor) * (1 - extrapolate) + inv_freq_extra * extrapolate
    return inv_freq, float(attn_factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, rotary dim / 2]. Rotates the two halves of each head's first rotary
    dim values (NeoX order); the others pass."""
    rotary = 2 * cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]), dim=-1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
