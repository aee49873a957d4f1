"""Turn a checkpoint's tensors into the decoder's canonical weights, checking every name and shape.

Families give a list of (regex, replacement) rules mapping checkpoint names to canonical names
(see `models.transformer.expected_shapes`). Experts arrive either as one 2D tensor per expert
(`layers.N.experts.E.{gate,up,down}`) or fused 3D (`layers.N.experts.{gate_up,down}`, possibly stored
transposed); both end up stacked as gate_up [E, 2I, D] and down [E, D, I].
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..errors import CheckpointError
from ..models.spec import ModelSpec
from ..models.transformer import expected_shapes
from .safetensors_reader import SafetensorsReader

Rules = list[tuple[str, str]]


def canonical_names(reader: SafetensorsReader, rules: Rules) -> dict[str, str]:
    """canonical name -> checkpoint name, for every checkpoint tensor a rule matches."""
    compiled = [(re.compile(pattern + "$"), repl) for pattern, repl in rules]
    out: dict[str, str] = {}
    for name in reader.names():
        for pattern, repl in compiled:
            if pattern.match(name):
                out[pattern.sub(repl, name)] = name
                break
    return out


def load_weights(
    reader: SafetensorsReader,
    spec: ModelSpec,
    rules: Rules,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Read every tensor the decoder needs. Returns (dense weights, per-layer gate_up, per-layer down)."""
    names = canonical_names(reader, rules)
    shapes = expected_shapes(spec)

    def read(canonical: str, shape: tuple[int, ...], allow_transposed: bool = False) -> torch.Tensor:
        src = names.get(canonical)
        if src is None:
            raise CheckpointError(f"checkpoint in {reader.dir} has no tensor for {canonical}")
        got = reader.shape(src)
        if got != shape:
            if not (allow_transposed and got == (shape[0], shape[2], shape[1])):
                raise CheckpointError(
                    f"tensor {src} in {reader.file_of(src).name} has shape {list(got)}, expected {list(shape)}"
                )
        t = reader.get(src)
        if got != shape:
            t = t.transpose(1, 2)
        if progress:
            progress(t.nbytes)
        return t.to(dtype).contiguous()

    weights: dict[str, torch.Tensor] = {}
    gate_up: list[torch.Tensor] = []
    down: list[torch.Tensor] = []
    for canonical, shape in shapes.items():
        if ".experts." in canonical:
            continue
        weights[canonical] = read(canonical, shape)
    for i, kind in enumerate(spec.ffn_kinds):
        if kind != "moe":
            gate_up.append(None)
            down.append(None)
            continue
        p = f"layers.{i}.experts."
        gu_shape, d_shape = shapes[p + "gate_up"], shapes[p + "down"]
        if p + "gate_up" in names:
            gate_up.append(read(p + "gate_up", gu_shape, allow_transposed=True))
            down.append(read(p + "down", d_shape, allow_transposed=True))
            continue
        E, I2, D = gu_shape
        gu = torch.empty(gu_shape, dtype=dtype)
        dn = torch.empty(d_shape, dtype=dtype)
        for e in range(E):
            gu[e, : I2 // 2] = read(f"{p}{e}.gate", (I2 // 2, D))
            gu[e, I2 // 2 :] = read(f"{p}{e}.up", (I2 // 2, D))
            dn[e] = read(f"{p}{e}.down", d_shape[1:])
        gate_up.append(gu)
        down.append(dn)
    return weights, gate_up, down

