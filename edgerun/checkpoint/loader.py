"""Turn a checkpoint's tensors into the decoder's canonical weights, checking every name and shape.

Families give a list of (regex, replacement) rules mapping checkpoint names to canonical names (the tensors
the decoder's parts declare, `Decoder.tensors`). Experts arrive either as one 2D tensor per expert
(`layers.N.experts.E.{gate,up,down}`) or fused 3D (`layers.N.experts.{gate_up,down}`, possibly stored
transposed); both end up stacked as gate_up [E, 2I, D] and down [E, D, I]. A family whose fused gate_up
interleaves gate and up rows (gpt-oss: gate, up, gate, up ...) says so with `spec.gate_up_interleaved`; its rows
(and biases) are brought into gate rows, then up rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..errors import CheckpointError
from ..models.decoder import Decoder
from ..models.spec import ModelSpec
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


class CheckpointTensors:
    """A checkpoint's tensors by canonical name, each checked against the shape the spec expects."""

    def __init__(self, reader: SafetensorsReader, spec: ModelSpec, rules: Rules):
        self.reader = reader
        self.spec = spec
        self.names = canonical_names(reader, rules)
        decoder = Decoder(spec)
        self.moe = decoder.moe  # layer -> its MoE part
        self.stored_experts = decoder.stored_experts
        self.declared = decoder.tensors()
        self.shapes = {name: t.shape for name, t in self.declared.items()}
        self.dense_names = [name for name, t in self.declared.items() if not t.expert]
        self.moe_layers = spec.moe_layers
        self.biased = decoder.expert_biases

    def _source(self, canonical: str) -> str:
        src = self.names.get(canonical)
        if src is None:
            raise CheckpointError(f"checkpoint in {self.reader.dir} has no tensor for {canonical}")
        return src

    def _shape_error(self, src: str, got: tuple, want: tuple) -> CheckpointError:
        return CheckpointError(f"tensor {src} ({self.reader.describe(src)}) has shape {list(got)}, expected "
                               f"{list(want)}")

    def check(self) -> None:
        """Every tensor the model needs is in the checkpoint with its shape (from the files' headers alone);
        raises CheckpointError naming the first one that is not."""
        for name, shape in self.shapes.items():
            if not re.search(r"\.experts\.(gate_up|down)$", name):  # the experts are checked below
                self._checked(name, shape)
        for layer in self.moe_layers:
            p = f"layers.{layer}.experts."
            if p + "gate_up" in self.names:
                for part in ("gate_up", "down"):
                    want = self.shapes[p + part]
                    src = self._source(p + part)
                    if self.reader.shape(src) not in (want, (want[0], want[2], want[1])):
                        raise self._shape_error(src, self.reader.shape(src), want)
                continue
            I, D = self.shapes[p + "down"][2], self.shapes[p + "down"][1]
            for e in range(self.spec.num_experts):
                for part, want in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I))):
                    self._checked(f"{p}{e}.{part}", want)

    def _checked(self, canonical: str, want: tuple) -> str:
        src = self._source(canonical)
        got = self.reader.shape(src)
        if got != want:
            raise self._shape_error(src, got, want)
        return src

    def dense(self, canonical: str) -> torch.Tensor:
        """A non-expert tensor, in the checkpoint's dtype."""
        return self.reader.get(self._checked(canonical, self.shapes[canonical]))

    def expert(self, layer: int, e: int) -> tuple[torch.Tensor, ...]:
        """(gate_up [2I, D] with gate rows first, down [D, I]) of one expert, in the checkpoint's dtype, then for
        experts with biases their gate_up [2I] and down [D] biases. Experts past the routed ones are slices of the
        layer's dense MLP (see ffn.ResidualMoE)."""
        p = f"layers.{layer}.experts."
        gu_shape, d_shape = self.shapes[p + "gate_up"], self.shapes[p + "down"]
        if e >= gu_shape[0]:
            return self._dense_slice(layer, e, gu_shape[1] // 2)
        if p + "gate_up" in self.names:
            gate_up, down = self._halves(self._fused(p + "gate_up", gu_shape, e)), self._fused(p + "down", d_shape, e)
            if not self.biased:
                return gate_up, down
            b1, b2 = (self.reader.get(self._checked(p + n, self.shapes[p + n]), e)
                      for n in ("gate_up_bias", "down_bias"))
            return gate_up, down, self._halves(b1), b2
        half = gu_shape[1] // 2
        gate = self._per_expert(f"{p}{e}.gate", (half, gu_shape[2]))
        gate_up = gate.new_empty(gu_shape[1:])  # one buffer for both halves: no third copy to concatenate them
        gate_up[:half] = gate
        del gate
        gate_up[half:] = self._per_expert(f"{p}{e}.up", (half, gu_shape[2]))
        return gate_up, self._per_expert(f"{p}{e}.down", d_shape[1:])

    def _dense_slice(self, layer: int, e: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice of the dense MLP `layers.N.mlp.*` that the MoE part holds as expert e, zero-padded to an
        expert's width (zero gate and up rows and down columns add exactly nothing)."""
        start, stop = self.moe[layer].dense_slice(e)
        p = f"layers.{layer}.mlp."
        gate, up = (self.reader.get_range(self._checked(p + n, self.shapes[p + n]), 0, start, stop)
                    for n in ("gate", "up"))
        down = self.reader.get_range(self._checked(p + "down", self.shapes[p + "down"]), 1, start, stop)
        if stop - start < width:
            pad = width - (stop - start)
            gate, up = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (gate, up))
            down = torch.cat([down, down.new_zeros(down.shape[0], pad)], dim=1)
        return torch.cat([gate, up]), down.contiguous()

    def _halves(self, t: torch.Tensor) -> torch.Tensor:
        """Interleaved gate and up rows (or biases) -> gate rows, then up rows; others as they are."""
        return torch.cat([t[0::2], t[1::2]]) if self.spec.gate_up_interleaved else t

    def _per_expert(self, canonical: str, want: tuple) -> torch.Tensor:
        return self.reader.get(self._checked(canonical, want))

    def _fused(self, canonical: str, want: tuple, e: int) -> torch.Tensor:
        # Fused experts are [E, out, in]; some checkpoints store them transposed as [E, in, out].
        src = self._source(canonical)
        got = self.reader.shape(src)
        if got == want:
            return self.reader.get(src, e)
        if got == (want[0], want[2], want[1]):
            return self.reader.get(src, e).T.contiguous()
        raise self._shape_error(src, got, want)


def load_weights(
    reader: SafetensorsReader,
    spec: ModelSpec,
    rules: Rules,
    dtype: torch.dtype,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list, list]:
    """Read every tensor the decoder needs, converted to dtype.

    Returns (dense weights, per-layer stacked gate_up [E, 2I, D], per-layer stacked down [E, D, I], per-layer
    expert biases (gate_up [E, 2I], down [E, D])); layers without experts (or without biases) have None.
    """
    tensors = CheckpointTensors(reader, spec, rules)

    def converted(t: torch.Tensor) -> torch.Tensor:
        if progress:
            progress(t.nbytes)
        return t.to(dtype).contiguous()

    weights = {name: converted(tensors.dense(name)) for name in tensors.dense_names}
    gate_up: list = [None] * spec.num_layers
    down: list = [None] * spec.num_layers
    biases: list = [None] * spec.num_layers
    for i in tensors.moe_layers:
        parts = list(zip(*(tensors.expert(i, e) for e in range(tensors.stored_experts))))
        gate_up[i], down[i] = (torch.stack([converted(t) for t in ts]) for ts in parts[:2])
        if len(parts) == 4:
            biases[i] = tuple(torch.stack([converted(t) for t in ts]) for ts in parts[2:])
    return weights, gate_up, down, biases
