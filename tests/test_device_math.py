"""The decoder's math runs where its weights, cache and tokens are (CUDA, MPS), without a GPU here.

Under FakeTensorMode tensors carry a device but no data, so a CPU-only build can make "cuda" tensors, and any op
that mixes devices raises FakeTensorDeviceMismatchError: a tensor the math creates on the CPU by default, next to
activations on the GPU, fails the forward pass. The experts container is a stand-in, as the real ones call
.tolist(), which needs data. Indexing and ~ need a shim on a CPU-only build (see fake_cuda).
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_leaves

from edgerun.models import spec_from_config
from edgerun.models.decoder import Decoder

CUDA = torch.device("cuda", 0)
SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-5)
CONFIGS = {
    # a window shorter than the prompt: prefill and decode both need a mask
    "mixtral": dict(model_type="mixtral", intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=3),
    # a gated shared expert, a dense layer, a sliding window on layer 0, q/k/v biases
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=80, moe_intermediate_size=48,
                      shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                      qkv_bias=True, use_sliding_window=True, sliding_window=3, max_window_layers=2),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=24, intermediate_size=80, moe_intermediate_size=48,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "olmoe": dict(model_type="olmoe", intermediate_size=48, num_experts=4, num_experts_per_tok=2, clip_qkv=0.5,
                  attention_bias=True),
    # soft-capped attention logits (the float32 path), sandwich norms, multipliers
    "grok-1": dict(model_type="grok-1", intermediate_size=96, num_experts=4, num_experts_per_tok=2),
    # residual MoE, the attention temperature (engaged past position 3), float32 router, final soft cap
    "grok-2": dict(model_type="git", architectures=["Grok1ForCausalLM"], residual_moe=True, intermediate_size=96,
                   moe_intermediate_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                   attn_temperature_len=3, final_logit_softcapping=50.0, embedding_multiplier_scale=20.0,
                   output_multiplier_scale=0.5),
}
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}
CONTEXT = 16
PROMPT = 6  # tokens of the prefill; then a chunk of 3 and one decode token


# Tensor methods whose C++ binding sets the current device before any op runs, which a CPU-only build cannot do
# for cuda, fake tensors included: of those, the ones the decoder uses
GUARDED = ("__getitem__", "__setitem__", "__invert__")


def _posing_as_cpu(method):
    """`method` with the fake cuda tensors it is given posing as CPU ones during the call: every op inside still
    sees a single device, and indexing or ~ put nothing on another device."""

    def call(self, *args):
        if not (isinstance(self, FakeTensor) and self.fake_device.type == "cuda"):
            return method(self, *args)
        device = self.fake_device
        posing = [t for t in tree_leaves((self, args)) if isinstance(t, FakeTensor) and t.fake_device == device]
        for t in posing:
            t.fake_device = torch.device("cpu")
        try:
            out = method(self, *args)
        finally:
            for t in posing:
                t.fake_device = device
        if isinstance(out, FakeTensor):
            out.fake_device = device
        return out

    return call


@contextmanager
def fake_cuda(monkeypatch):
    """FakeTensorMode, in which the GUARDED methods work on cuda tensors."""
    for name in GUARDED:
        monkeypatch.setattr(FakeTensor, name, _posing_as_cpu(getattr(torch.Tensor, name)), raising=False)
    with FakeTensorMode():
        yield


def decoder_for(cfg: dict) -> Decoder:
    _, spec = spec_from_config({**SIZES, **cfg})
    return Decoder(spec)


def bind(decoder: Decoder, device, **replace) -> None:
    """Random weights on `device` (fake under FakeTensorMode) but those in `replace`, a stand-in experts
    container."""
    weights = {name: torch.randn(t.shape, device=device) for name, t in decoder.tensors().items() if not t.expert}
    decoder.bind({**weights, **{name: make(weights[name]) for name, make in replace.items()}})

    def experts(layer, x, idx, weights):
        assert idx.device == weights.device == x.device
        return x * weights.sum(-1, keepdim=True).to(x.dtype)

    decoder.use_experts(experts)


def run(decoder: Decoder, device) -> None:
    """Prefill, a second chunk and a decode step on `device`, checking where everything lands."""
    V = decoder.spec.vocab_size
    cache = decoder.new_cache(CONTEXT, device=device)
    assert all(c.k.device == c.v.device == torch.device(device) for c in cache.layers)
    logits = decoder.forward(torch.arange(PROMPT, device=device), cache, all_logits=True)
    assert logits.device == torch.device(device) and logits.shape == (PROMPT, V)
    logits = decoder.forward(torch.arange(3, device=device), cache)
    assert logits.device == torch.device(device) and logits.shape == (1, V)
    logits = decoder.forward(torch.tensor([5], device=device), cache)
    assert logits.device == torch.device(device) and logits.shape == (1, V)
    assert cache.length == PROMPT + 4
    moe = decoder.moe_layers
    if moe:
        x = torch.randn(2, decoder.spec.hidden_size, device=device)
        r = decoder.lookahead(moe[0], moe[-1], x)
        assert r.idx.device == r.weights.device == r.probs.device == torch.device(device)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_family_runs_on_the_device_of_its_weights(family, monkeypatch):
    with fake_cuda(monkeypatch):
        decoder = decoder_for(CONFIGS[family])
        bind(decoder, CUDA)
        run(decoder, CUDA)


@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_schedules_run_on_the_device(rope, monkeypatch):
    cfg = dict(CONFIGS["qwen3_moe"], max_position_embeddings=4, rope_parameters={"rope_theta": 1e4, **ROPES[rope]})
    with fake_cuda(monkeypatch):
        decoder = decoder_for(cfg)
        bind(decoder, CUDA)
        run(decoder, CUDA)


def test_one_decoder_on_two_devices_keeps_a_rotary_table_for_each(monkeypatch):
    with fake_cuda(monkeypatch):
        decoder = decoder_for(CONFIGS["mixtral"])
        for device in ("cpu", CUDA, "cpu"):
            bind(decoder, device)
            run(decoder, device)


def test_an_embedding_that_is_not_a_tensor_gets_the_ids_where_they_are(monkeypatch):
    class Rows:
        """A matrix in another form than a tensor (quantized, for instance), tied to the output."""

        def __init__(self, w):
            self.w, self.dtype = w, w.dtype

        def rows(self, ids):
            assert ids.device == self.w.device
            return self.w[ids]

        def linear(self, x, bias=None):
            return torch.nn.functional.linear(x, self.w, bias)

    with fake_cuda(monkeypatch):
        decoder = decoder_for(dict(CONFIGS["grok-1"], tie_word_embeddings=True))
        bind(decoder, CUDA, embed=Rows)
        run(decoder, CUDA)
