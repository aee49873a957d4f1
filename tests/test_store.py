"""The expert store: conversion, layout, integrity checks, resuming, and running from a store."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import edgerun
from edgerun.cli import main
from edgerun.store.convert import LOG_FILE, convert
from edgerun.store.store import ExpertStore, expert_chunk_path, is_store
from hf_models import build, hf_logits, save

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]
MIXTRAL_TOKENIZER = Path(__file__).parent / "data" / "mixtral-8x7b-tokenizer.model"
# q8 on the tiny test models, as documented in the README: max |logit error| <= 0.1 std(logits)
# (measured 0.05-0.07 std)
Q8_LOGIT_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    families = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss_calm")
    return {family: (model, save(model, base / family)) for family, model in ((f, build(f)) for f in families)}


def tree_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_none_store_matches_hf_directory(hf_dirs, tmp_path):
    hf, src = hf_dirs["qwen2_moe"]
    dst = convert(src, tmp_path / "store", quant="none")
    assert is_store(dst) and not (tmp_path / "store.partial").exists()
    store = ExpertStore(dst)
    assert store.expert_layout.fmt == "f32" and store.moe_layers == [0]  # layer 1 is dense
    from_store = edgerun.load(dst).logits(PROMPT)
    assert np.array_equal(from_store, edgerun.load(src).logits(PROMPT))
    assert np.abs(from_store - hf_logits(hf, PROMPT).numpy()).max() <= 1e-4


def test_bf16_store_gives_the_same_logits_as_the_hf_directory(tmp_path):
    src = save(build("mixtral"), tmp_path / "bf16", dtype=torch.bfloat16)
    dst = convert(src, tmp_path / "store", quant="bf16")
    model = edgerun.load(dst)
    assert model.stats()["dtype"] == "bfloat16"
    assert np.array_equal(model.logits(PROMPT), edgerun.load(src).logits(PROMPT))
    assert model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == \
        edgerun.load(src).generate_ids(PROMPT, 8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                    "glm4_moe", "gpt_oss_calm"])
def test_q8_store_is_close_to_float32(hf_dirs, family, tmp_path):
    hf, src = hf_dirs[family]
    dst = convert(src, tmp_path / "q8", quant="q8")
    store = ExpertStore(dst)
    assert store.expert_layout.fmt == "q8" and store.quant["dense"] == "q8"
    model = edgerun.load(dst)
    want = hf_logits(hf, PROMPT).numpy()
    err = np.abs(model.logits(PROMPT) - want).max()
    assert err <= Q8_LOGIT_TOLERANCE * want.std(), err
    # greedy decoding agrees wherever float32 itself is not at a near tie: take a prompt whose float32
    # continuation never has its top two logits closer than twice the tolerated error
    prompt, continuation = clear_greedy_prompt(hf, min_margin=2 * Q8_LOGIT_TOLERANCE * want.std())
    assert model.generate_ids(prompt, 8, temperature=0, ignore_eos=True) == continuation


def clear_greedy_prompt(hf, min_margin: float, steps: int = 8) -> tuple[list[int], list[int]]:
    for seed in range(64):
        ids = np.random.default_rng(seed).integers(0, 128, 16).tolist()
        prompt, margins = list(ids), []
        for _ in range(steps):
            top2 = torch.topk(hf_logits(hf, ids)[-1], 2)
            margins.append(float(top2.values[0] - top2.values[1]))
            ids.append(int(top2.indices[0]))
        if min(margins) >= min_margin:
            return prompt, ids[16:]
    pytest.fail(f"no prompt with a clear greedy continuation (margin {min_margin:.3f})")


def test_q4_store_tracks_float32(hf_dirs, tmp_path):
    hf, src = hf_dirs["mixtral"]
    dst = convert(src, tmp_path / "q4")
    store = ExpertStore(dst)
    assert store.expert_layout.fmt == "q4" and store.quant["dense"] == "q8"
    got, want = edgerun.load(dst).logits(PROMPT), hf_logits(hf, PROMPT).numpy()
    # 4-bit weights move the logits, but they stay strongly correlated with float32
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98
    q4_bytes = store.chunk_bytes
    q8_bytes = ExpertStore(convert(src, tmp_path / "q8", quant="q8")).chunk_bytes
    assert q4_bytes < q8_bytes


def test_q4_dense_weights_keep_the_output_head_at_q8(hf_dirs, tmp_path, monkeypatch):
    from edgerun.demo_model import demo_model_dir
    from edgerun.runtime import placement

    hf, src = hf_dirs["mixtral"]  # untied: the input embedding is one more q4 matrix, the output head stays q8
    store = ExpertStore(convert(src, tmp_path / "untied", quant="q4", dense="q4"))
    formats = {name: store.tensor_layout(name).fmt for name in store.tensor_names()}
    assert formats["lm_head"] == "q8" and formats["embed"] == formats["layers.0.q"] == "q4"
    tied = ExpertStore(convert(demo_model_dir(), tmp_path / "tied", quant="q4", dense="q4"))
    assert tied.tensor_layout("embed").fmt == "q8" and "lm_head" not in tied.tensor_names()
    # a store converted before the head was kept at q8 holds it at q4, and loads as it is
    new_logits = edgerun.load(store.path).logits(PROMPT)
    monkeypatch.setattr(placement, "stored_format", lambda t, dense: "f32" if t.exact else dense)
    old = ExpertStore(convert(src, tmp_path / "old", quant="q4", dense="q4"))
    monkeypatch.undo()
    assert old.tensor_layout("lm_head").fmt == "q4"
    old_logits = edgerun.load(old.path).logits(PROMPT)
    want = hf_logits(hf, PROMPT).numpy()
    assert np.abs(old_logits - want).max() > np.abs(new_logits - want).max()  # the 4-bit head costs accuracy


def test_quantized_q_k_v_are_one_matrix_and_compute_as_three(hf_dirs, tmp_path):
    """A quantized store's q, k and v are stacked at load into one matrix they view (one kernel call per token
    instead of three), and the logits are those of the three matrices apart, bit for bit."""
    from edgerun.runtime.quantized import QuantizedMatrix

    _, src = hf_dirs["mixtral"]
    model = edgerun.load(convert(src, tmp_path / "s", quant="q4", dense="q4"))
    blocks = model._engine.decoder.blocks
    for block in blocks:
        whole, _, sizes = block.attention.qkv
        w = block.attention.w
        assert sizes == [w[n].out_features for n in "qkv"] and sum(sizes) == whole.out_features
        assert all(np.shares_memory(w[n].qs, whole.qs) for n in "qkv")
    stacked = model.logits(PROMPT, decode=True)
    for block in blocks:
        block.attention.qkv = None
    assert np.array_equal(model.logits(PROMPT, decode=True), stacked)
    q8 = QuantizedMatrix(np.zeros((4, 32), np.int8), np.ones((4, 1), np.float16), 32)
    q4 = QuantizedMatrix(np.zeros((4, 16), np.uint8), np.ones((4, 1), np.float16), 32)
    assert QuantizedMatrix.stacked([q8, q4]) is None and QuantizedMatrix.stacked([q8, q8]).out_features == 8


def test_store_layout_on_disk(hf_dirs, tmp_path):
    _, src = hf_dirs["olmoe"]
    dst = convert(src, tmp_path / "s", quant="q4")
    meta = json.loads((dst / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    experts = json.loads((dst / "experts" / "zarr.json").read_text())
    assert experts["codecs"] == [{"name": "bytes"}]  # raw bytes, uncompressed
    store = ExpertStore(dst)
    assert list(experts["chunk_grid"]["configuration"]["chunk_shape"]) == [1, 1, store.chunk_bytes]
    assert store.chunk_bytes % 4096 == 0
    for layer in store.moe_layers:
        for e in range(store.num_experts):
            assert expert_chunk_path(dst, layer, e).stat().st_size == store.chunk_bytes
    info = meta["attributes"]["edgerun"]
    assert info["config"]["model_type"] == "olmoe" and info["quant"]["group"] == 32
    assert info["tensors"]["layers.0.router"]["format"] == "f32"  # routers stay exact
    assert info["tensors"]["layers.0.q"]["format"] == "q8"


def test_chunk_access_by_memmap_and_reader(hf_dirs, tmp_path):
    from edgerun.runtime.reader import ExpertReader

    _, src = hf_dirs["mixtral"]
    store = ExpertStore(convert(src, tmp_path / "s", quant="q8"))
    mapped = store.map_expert(1, 3)
    buf = np.zeros(store.chunk_bytes, dtype=np.uint8)
    reader = ExpertReader(store, direct=False)
    reader.wait(reader.submit(None, 1, 3, buf, demand=True))
    reader.close()
    assert np.array_equal(buf, mapped)
    (gu_qs, gu_scales), (d_qs, d_scales) = store.expert_views(1, 3)
    assert gu_qs.dtype == np.int8 and gu_qs.shape == (2 * 96, 64) and d_qs.shape == (64, 96)
    assert gu_scales.dtype == np.float16 and gu_scales.shape == (192, 2)


def vm_flags(array: np.ndarray) -> set[str] | None:
    """The kernel's VmFlags of the mapping holding array (Linux), or None where /proc/self/smaps is missing."""
    if not Path("/proc/self/smaps").exists():
        return None
    addr, flags, inside = array.ctypes.data, None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "VmFlags:":
            flags = set(line.split()[1:])
    return flags


def test_a_resident_store_is_mapped_in_huge_pages_and_a_streaming_one_is_not(hf_dirs, tmp_path, monkeypatch):
    """A store that stays mapped asks the kernel for huge pages ("hg" in its mappings' VmFlags), experts and dense
    tensors; one whose experts stream through cache slots maps its dense tensors without the advice."""
    import mmap

    from test_offload import budget_for

    from edgerun.store.store import map_file

    _, src = hf_dirs["mixtral"]
    path = convert(src, tmp_path / "s", quant="q4")
    if not hasattr(mmap, "MADV_HUGEPAGE") or vm_flags(np.zeros(1)) is None:
        pytest.skip("no transparent huge pages or /proc/self/smaps here")
    if "hg" not in vm_flags(map_file(expert_chunk_path(path, 0, 1), huge_pages=True)):
        pytest.skip("this kernel refuses MADV_HUGEPAGE")
    assert "hg" not in vm_flags(map_file(expert_chunk_path(path, 0, 0)))
    resident = edgerun.load(path)._engine.experts.store
    assert resident.huge_pages and "hg" in vm_flags(resident.map_expert(1, 2))
    assert "hg" in vm_flags(resident.tensor_views(resident.tensor_names()[0])[0])
    streaming = edgerun.load(path, context_length=64, ram=budget_for(path, 4, monkeypatch))._engine.experts.store
    assert not streaming.huge_pages and "hg" not in vm_flags(streaming.tensor_views(streaming.tensor_names()[0])[0])


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_chunk_is_detected(hf_dirs, tmp_path):
    _, src = hf_dirs["mixtral"]
    dst = convert(src, tmp_path / "s", quant="q8")
    flip_byte(expert_chunk_path(dst, 1, 2))
    store = ExpertStore(dst)  # opening reads no expert bytes
    with pytest.raises(edgerun.CheckpointError, match="layer 1 expert 2"):
        store.map_expert(1, 2)
    from edgerun.runtime.reader import ExpertReader

    reader = ExpertReader(store, direct=False)
    with pytest.raises(edgerun.CheckpointError, match="layer 1 expert 2"):
        reader.wait(reader.submit(None, 1, 2, np.zeros(store.chunk_bytes, np.uint8), demand=True))
    reader.close()
    model = edgerun.load(dst)
    with pytest.raises(edgerun.CheckpointError, match="checksum mismatch in layer 1 expert 2"):
        for start in range(0, 100, 4):  # some prompt routes to the damaged expert
            model.logits([(start + i * 7) % 128 for i in range(24)])


def test_truncated_chunk_is_detected_on_open(hf_dirs, tmp_path, capsys):
    _, src = hf_dirs["mixtral"]
    dst = convert(src, tmp_path / "s", quant="q4")
    path = expert_chunk_path(dst, 0, 3)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(edgerun.CheckpointError, match="layer 0 expert 3"):
        edgerun.load(dst)
    assert main(["run", str(dst), "-p", "hi"]) == 2
    assert "layer 0 expert 3" in capsys.readouterr().err


def test_damaged_dense_tensor_is_detected(hf_dirs, tmp_path):
    _, src = hf_dirs["mixtral"]
    dst = convert(src, tmp_path / "s", quant="q8")
    flip_byte(dst / "dense" / "layers.0.q" / "c" / "0", 10)
    with pytest.raises(edgerun.CheckpointError, match="layers.0.q"):
        edgerun.load(dst)


KILL_SCRIPT = """
import os, signal, sys
from edgerun.store.convert import convert
done = []
def stop_after(item):
    done.append(item)
    if len(done) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
convert(sys.argv[1], sys.argv[2], quant="q4", on_item=stop_after)
"""


def test_interrupted_convert_resumes_to_an_identical_store(hf_dirs, tmp_path):
    _, src = hf_dirs["qwen3_moe"]
    whole = convert(src, tmp_path / "whole", quant="q4")
    dst = tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(dst), "12"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed mid-way
    partial = tmp_path / "resumed.partial"
    assert not dst.exists() and partial.is_dir()
    logged = (partial / LOG_FILE).read_text().splitlines()
    assert len(logged) == 12
    redone = []
    convert(src, dst, quant="q4", on_item=redone.append)
    assert not partial.exists()
    finished = {json.loads(line)["item"] for line in logged}
    assert redone and not finished & set(redone)  # nothing finished before is done again
    assert tree_files(whole) == tree_files(dst)
    mismatch = [f for f in tree_files(whole) if not filecmp.cmp(whole / f, dst / f, shallow=False)]
    assert mismatch == []


def test_convert_refuses_bad_requests(hf_dirs, tmp_path, capsys):
    _, src = hf_dirs["mixtral"]
    (tmp_path / "exists").mkdir()
    with pytest.raises(edgerun.EdgerunError, match="already exists"):
        convert(src, tmp_path / "exists")
    with pytest.raises(edgerun.EdgerunError, match="multiple of 32"):
        convert(src, tmp_path / "g", group=48)
    with pytest.raises(edgerun.EdgerunError, match="quant must be one of"):
        convert(src, tmp_path / "q", quant="q3")
    # an unfinished conversion with other settings is not silently mixed with a new one
    (tmp_path / "m.partial").mkdir()
    (tmp_path / "m.partial" / "edgerun-plan.json").write_text("{}")
    with pytest.raises(edgerun.EdgerunError, match="other settings"):
        convert(src, tmp_path / "m", quant="q8")
    assert main(["convert", str(src), str(tmp_path / "exists")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_load_converts_once_into_the_cache(hf_dirs, monkeypatch):
    hf, src = hf_dirs["olmoe"]
    model = edgerun.load(src, quant="q8")
    assert is_store(model.path) and model.stats()["quant"] == "q8"
    # the second load reuses the cached store
    import edgerun.store.convert as conv

    monkeypatch.setattr(conv, "convert", lambda *a, **k: pytest.fail("converted twice"))
    again = edgerun.load(src, quant="q8")
    assert again.path == model.path
    assert np.array_equal(again.logits(PROMPT), model.logits(PROMPT))
    with pytest.raises(edgerun.ArgumentError, match="already a converted store"):
        edgerun.load(model.path, quant="q4")


def test_chat_from_a_store_uses_the_stored_tokenizer(tmp_path):
    src = save(build("mixtral", vocab_size=32000), tmp_path / "m")
    shutil.copyfile(MIXTRAL_TOKENIZER, src / "tokenizer.model")
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "chat_template": template}))
    dst = convert(src, tmp_path / "store", quant="none")
    os.rename(src, tmp_path / "gone")  # the store stands on its own
    model = edgerun.load(dst)
    reply = model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=5, temperature=0)
    assert isinstance(reply, str) and model.stats()["generated_tokens"] == 5


def test_convert_and_bench_commands(hf_dirs, tmp_path, capsys):
    _, src = hf_dirs["mixtral"]
    assert main(["convert", str(src), str(tmp_path / "s"), "--quant", "q8", "--dense", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "MB/s" in err and "peak RSS" in err
    assert ExpertStore(tmp_path / "s").quant["dense"] == "bf16"
    assert main(["bench", str(tmp_path / "s"), "--json", "--prompt-tokens", "16", "--tokens", "4",
                 "--repeats", "1", "--no-kernels"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0
    assert result["expert_format"] == "q8"


def test_stores_of_the_first_format_version_are_still_read(hf_dirs, tmp_path):
    """Version 2 added the experts' biases to chunks; a version 1 store (none) reads as it is, and a store of a
    version this edgerun does not know is refused in one line."""
    hf, src = hf_dirs["qwen2_moe"]
    dst = convert(src, tmp_path / "s", quant="q8", progress=False)
    want = edgerun.load(dst).logits(PROMPT)
    doc = json.loads((dst / "zarr.json").read_text())
    meta = doc["attributes"]["edgerun"]
    assert meta["version"] == 2 and meta["experts"]["biases"] is False
    meta["version"] = 1
    del meta["experts"]["biases"]
    (dst / "zarr.json").write_text(json.dumps(doc))
    assert np.array_equal(edgerun.load(dst).logits(PROMPT), want)
    meta["version"] = 3
    (dst / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(edgerun.EdgerunError, match="v3; this edgerun reads edgerun-store v1 and v2: convert"):
        edgerun.load(dst)
