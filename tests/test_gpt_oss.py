"""gpt-oss beyond the per-family parity tests: its MXFP4 release layout, stores with expert biases, offloading and
the device tier.

The MXFP4 release is written as OpenAI publishes gpt-oss: each expert matrix [E, out, in] as `*_blocks`
[E, out, in / 32, 16] (two E2M1 values a byte, low nibble first) and `*_scales` [E, out, in / 32] (E8M0
exponents, biased by 127), gate and up rows alternating, the biases in bfloat16 beside them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import edgerun
from edgerun.checkpoint.safetensors_reader import SafetensorsReader
from edgerun.errors import CheckpointError, EdgerunError
from edgerun.runtime.offload import OffloadedExperts
from edgerun.store import quant
from edgerun.store.convert import convert
from edgerun.store.lowbit import add_low_copies
from edgerun.store.store import ExpertStore
from hf_models import build, hf_greedy, hf_logits, save

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(blocks, scales, the values they hold) of w [..., K]: per 32 values the exponent that brings the largest
    within 6, then each value's nearest E2M1 code."""
    v = w.float().numpy().reshape(*w.shape[:-1], -1, 32)
    amax = np.abs(v).max(axis=-1, keepdims=True)
    exp = np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)).astype(np.int32)
    scaled = v / np.exp2(exp)
    codes = np.abs(scaled[..., None] - E2M1).argmin(axis=-1).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    values = (E2M1[codes] * np.exp2(exp)).reshape(w.shape)
    blocks, scales = (np.ascontiguousarray(a, dtype=np.uint8) for a in (blocks, exp[..., 0] + 127))
    return torch.from_numpy(blocks), torch.from_numpy(scales), torch.from_numpy(values)


def write_mxfp4_release(model, path):
    """The model's experts in the release's MXFP4 layout at path; returns the model transformers loads from a
    float32 copy of what the release holds."""
    save(model, path)
    tensors = load_file(path / "model.safetensors")
    out, reference = {}, {}
    for name, w in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] in transformers' layout
            blocks, scales, values = to_mxfp4(w.transpose(1, 2))
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
            reference[name] = values.transpose(1, 2).contiguous()
        else:
            out[name] = w.to(torch.bfloat16) if name.endswith("_bias") else w
            reference[name] = out[name].float()
    (path / "model.safetensors").unlink()
    save_file(out, path / "model.safetensors")
    ref_dir = path.parent / "reference"
    save(model, ref_dir)
    save_file(reference, ref_dir / "model.safetensors")
    return type(model).from_pretrained(ref_dir, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("mxfp4") / "gpt-oss"
    # expert width 96: MXFP4 needs whole blocks of 32 along both matrices' inputs
    return write_mxfp4_release(build("gpt_oss", intermediate_size=96), path), path


def test_the_mxfp4_release_runs_as_the_values_it_holds(release):
    hf, path = release
    files = load_file(path / "model.safetensors")
    assert files["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 192, 2, 16)
    model = edgerun.load(path)
    got, want = model.logits(PROMPT), hf_logits(hf, PROMPT).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == hf_greedy(hf, PROMPT, 8)


def test_mxfp4_tensors_expand_an_expert_at_a_time(release):
    _, path = release
    reader = SafetensorsReader(path)
    name = "model.layers.1.mlp.experts.down_proj"
    assert name in reader.names() and name + "_blocks" not in reader.names()
    assert reader.shape(name) == (4, 64, 96) and reader.dtype(name) == torch.bfloat16
    whole = reader.get(name)
    assert whole.dtype == torch.bfloat16 and torch.equal(reader.get(name, 2), whole[2])
    blocks = load_file(path / "model.safetensors")[name + "_blocks"]
    # one byte, by hand: element 2i is the low nibble, 2i + 1 the high one, both times 2 ** (scale - 127)
    byte, scale = int(blocks[2, 5, 1, 3]), int(load_file(path / "model.safetensors")[name + "_scales"][2, 5, 1])
    lo, hi = E2M1[byte & 15] * 2.0 ** (scale - 127), E2M1[byte >> 4] * 2.0 ** (scale - 127)
    assert (float(whole[2, 5, 32 + 6]), float(whole[2, 5, 32 + 7])) == (lo, hi)


def test_mxfp4_blocks_without_their_scales_are_refused(tmp_path):
    save_file({"m_blocks": torch.zeros(4, 2, 16, dtype=torch.uint8)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="MXFP4"):
        SafetensorsReader(tmp_path)


@pytest.fixture(scope="module")
def q4_store(release, tmp_path_factory):
    _, path = release
    return convert(path, tmp_path_factory.mktemp("gpt-oss-q4") / "q4", quant="q4", progress=False)


def test_a_store_keeps_the_expert_biases_in_each_chunk(release, q4_store):
    hf, path = release
    store = ExpertStore(q4_store)
    assert store.expert_layout.biases and store.meta["experts"]["biases"] and store.meta["version"] == 2
    gate_up_bias, down_bias = store.expert_biases(1, 3)
    # gate and up alternate in the release; a chunk holds gate's biases first, then up's
    want = hf.model.layers[1].mlp.experts.gate_up_proj_bias[3].detach()
    assert np.array_equal(gate_up_bias, torch.cat([want[0::2], want[1::2]]).numpy())
    assert np.array_equal(down_bias, hf.model.layers[1].mlp.experts.down_proj_bias[3].detach().numpy())
    q4 = edgerun.load(q4_store)
    want_logits = hf_logits(hf, PROMPT).numpy()
    assert np.corrcoef(q4.logits(PROMPT).ravel(), want_logits.ravel())[0, 1] > 0.95
    with pytest.raises(EdgerunError, match="biases"):
        add_low_copies(q4_store)


def test_offloaded_experts_give_the_resident_tokens(q4_store):
    resident = edgerun.load(q4_store)
    want_tokens, want_logits = resident.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True), \
        resident.logits(PROMPT)
    model = edgerun.load(q4_store)
    experts = OffloadedExperts(ExpertStore(q4_store), model.spec.activation, slots=3)
    model.use_experts(experts).close()
    assert model.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True) == want_tokens
    assert model.stats()["bytes_read"] > 0
    assert np.array_equal(model.logits(PROMPT), want_logits)
    experts.close()


def test_the_device_tier_computes_the_biases(q4_store, monkeypatch):
    from edgerun import native

    monkeypatch.setattr(native, "INT_DOT", False)  # float32 on both sides: they agree to rounding
    resident = edgerun.load(q4_store, gpu=0)
    want_tokens, want_logits = resident.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True), \
        resident.logits(PROMPT)
    model = edgerun.load(q4_store, gpu="64MB", device="cpu", misses="copy")
    assert model.stats()["memory_plan"]["gpu"]["slots"] > 0
    assert model.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True) == want_tokens
    assert model.stats()["gpu_expert_share"] > 0
    got = model.logits(PROMPT)
    assert np.abs(got - want_logits).max() <= 1e-5 * np.abs(want_logits).max()


# -- experts kept in MXFP4 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mxfp4_store(release, tmp_path_factory):
    _, path = release
    return convert(path, tmp_path_factory.mktemp("gpt-oss-mxfp4") / "s", quant="mxfp4", dense="none", progress=False)


def test_an_mxfp4_store_holds_the_release_values_exactly(release, mxfp4_store, q4_store):
    hf, path = release
    store = ExpertStore(mxfp4_store)
    layouts = (store.expert_layout, ExpertStore(q4_store).expert_layout)
    sections = [(lay.gate_up.nbytes, lay.down.nbytes) for lay in layouts]
    assert store.expert_layout.fmt == "mxfp4" and sum(sections[0]) < sum(sections[1])  # 4.25 bits a weight, not 4.5
    (gq, gs), (dq, ds) = store.expert_views(1, 2)
    assert gs.dtype == np.uint8  # E8M0 exponents
    release_gate_up = SafetensorsReader(path).get("model.layers.1.mlp.experts.gate_up_proj", 2).float()
    want = torch.cat([release_gate_up[0::2], release_gate_up[1::2]]).numpy()  # gate rows, then up rows
    assert np.array_equal(quant.dequantize(gq, gs, 64), want)
    # with the other matrices unquantized, the store computes the release's own model
    model = edgerun.load(mxfp4_store)
    want_logits = hf_logits(hf, PROMPT).numpy()
    assert np.abs(model.logits(PROMPT) - want_logits).max() <= 1e-4
    assert model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == hf_greedy(hf, PROMPT, 8)


def test_mxfp4_experts_offload_and_run_on_the_device_tier(mxfp4_store, monkeypatch):
    resident = edgerun.load(mxfp4_store, gpu=0)
    want_tokens = resident.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True)
    want_logits = resident.logits(PROMPT)
    model = edgerun.load(mxfp4_store)
    experts = OffloadedExperts(ExpertStore(mxfp4_store), model.spec.activation, slots=3)
    model.use_experts(experts).close()
    assert model.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True) == want_tokens
    experts.close()
    on_device = edgerun.load(mxfp4_store, gpu="64MB", device="cpu", misses="copy")
    assert on_device.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True) == want_tokens
    assert on_device.stats()["gpu_expert_share"] > 0
    assert np.abs(on_device.logits(PROMPT) - want_logits).max() <= 1e-5 * np.abs(want_logits).max()


def test_mxfp4_takes_groups_of_32(release, tmp_path):
    _, path = release
    with pytest.raises(edgerun.ArgumentError, match="groups of 32"):
        convert(path, tmp_path / "s", quant="mxfp4", group=64, progress=False)
