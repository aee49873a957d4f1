"""Grok-1 straight from xai-org's JAX release (`ckpt-0/`), against the same weights in a community layout.

The release is written in the test (grok1_release_writer, from xai-org's code) with 12 layers, so that the
files' order (layers sorted as text: 0, 1, 10, 11, 2, ...) differs from numeric order, and with the attention
output and experts' down matrices scaled per 8 blocks of input rows, as the release has them.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from grok1_release_writer import write_release
from grok_reference import forward, greedy
from test_grok import PROMPT, STEPS, TOL, make_weights, write

import edgerun
from edgerun.checkpoint.grok1_release import RELEASED, parameters
from edgerun.checkpoint.restricted_pickle import read_pickle
from edgerun.store.convert import convert

DATA = Path(__file__).parent / "data"
LAYERS = 12
TOL12 = 5 * TOL  # float32 rounding over 12 layers instead of test_grok's 2; a wrong mapping is off by O(1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release folder, community-layout folder of the same weights, those weights, config)."""
    weights, cfg = make_weights("real", layers=LAYERS)
    root = tmp_path_factory.mktemp("grok1") / "grok-1"
    held = write_release(root, weights, cfg)
    shutil.copyfile(DATA / "grok-1-tokenizer.model", root / "tokenizer.model")
    community = write(tmp_path_factory.mktemp("community"), held, cfg)
    return root, community, held, cfg


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst)
    return dst


# --- the file order ---------------------------------------------------------------------------------------

def test_the_released_model_has_770_files_in_jax_tree_order():
    params = parameters(RELEASED)
    assert len(params) == 770
    assert [p.path for p in params[:2]] == ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    layer0 = [p.path.removeprefix("transformer/decoder_layer_0/") for p in params[2:14]]
    assert layer0 == ["moe/linear/w", "moe/linear_1/w", "moe/linear_v/w", "multi_head_attention/key/w",
                      "multi_head_attention/linear/w", "multi_head_attention/query/w",
                      "multi_head_attention/value/w", "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale",
                      "rms_norm_3/scale", "router/w"]
    # layers sort as text: 0, 1, 10, 11, ..., 19, 2, 20, ...
    firsts = [p.path.split("/")[1] for p in params[2::12]]
    assert firsts[:4] == ["decoder_layer_0", "decoder_layer_1", "decoder_layer_10", "decoder_layer_11"]
    assert firsts[12] == "decoder_layer_2"
    shapes = {p.path.removeprefix("transformer/decoder_layer_7/"): p.shape for p in params
              if "decoder_layer_7/" in p.path}
    assert shapes["moe/linear_1/w"] == (8, 32768, 6144) and shapes["moe/linear/w"] == (8, 6144, 32768)
    assert shapes["multi_head_attention/key/w"] == (6144, 1024) and shapes["router/w"] == (6144, 8)
    assert RELEASED.ffn_size == 32768


# --- correctness against the community layout ------------------------------------------------------------

def test_release_runs_like_its_weights_in_float32(release):
    root, _, held, cfg = release
    model = edgerun.load(root, dtype="float32")
    ref = forward(held, cfg, PROMPT).numpy()
    got = model.logits(PROMPT)
    assert float(np.abs(got - ref).max()) <= TOL12
    want, margin = greedy(held, cfg, PROMPT, STEPS)
    assert margin > 10 * TOL12
    assert model.generate_ids(PROMPT, max_new_tokens=STEPS, temperature=0.0, ignore_eos=True) == want


@pytest.mark.parametrize("quant", ["q8", "q4"])
def test_converted_release_equals_the_community_layout(release, tmp_path, quant):
    root, community, held, cfg = release
    a = convert(root, tmp_path / "from-release", quant=quant, progress=False)
    b = convert(community, tmp_path / "from-community", quant=quant, progress=False)
    ma, mb = edgerun.load(a), edgerun.load(b)
    la, lb = ma.logits(PROMPT), mb.logits(PROMPT)
    # the same values in, the same quantized bytes out: only float32 rounding may differ
    assert float(np.abs(la - lb).max()) <= 1e-4
    for name in ma.decoder.tensors():
        if not ma.decoder.tensors()[name].expert:
            assert _stored(a, name) == _stored(b, name), name
    if quant == "q8":
        want = mb.generate_ids(PROMPT, max_new_tokens=STEPS, temperature=0.0, ignore_eos=True)
        assert ma.generate_ids(PROMPT, max_new_tokens=STEPS, temperature=0.0, ignore_eos=True) == want
    assert (a / "experts").is_dir() and _expert_bytes(a) == _expert_bytes(b)


def _stored(store: Path, name: str) -> bytes:
    from edgerun.store.store import tensor_chunk_path

    return tensor_chunk_path(store, name).read_bytes()


def _expert_bytes(store: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted((store / "experts").rglob("*")) if f.is_file()]


def test_release_through_the_cli_and_its_tokenizer(release, tmp_path):
    root, _, _, _ = release
    dst = tmp_path / "store"
    out = subprocess.run([sys.executable, "-m", "edgerun.cli", "convert", str(root / "ckpt-0"), str(dst),
                          "--quant", "q8"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "MB/s of checkpoint" in out.stderr
    model = edgerun.load(dst)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(DATA / "grok-1-tokenizer.model"))
    text = "The answer to life the universe and everything is of course"
    assert model.tokenizer.encode(text) == sp.encode(text)  # no BOS, as xai-org's runners.py encodes


def test_numpy1_pickles_and_a_grok1_config_for_other_sizes(tmp_path):
    weights, cfg = make_weights("exaggerated")
    held = write_release(tmp_path / "r", weights, cfg, blocks=4, numpy1_names=True)
    assert b"numpy.core.multiarray" in (tmp_path / "r/ckpt-0/tensor00005_000").read_bytes()
    shutil.copyfile(DATA / "grok-1-tokenizer.model", tmp_path / "r/tokenizer.model")
    model = edgerun.load(tmp_path / "r", dtype="float32")
    assert float(np.abs(model.logits(PROMPT) - forward(held, cfg, PROMPT).numpy()).max()) <= TOL


def test_the_tokenizer_may_sit_one_folder_up(release, tmp_path):
    """xai-org/grok-1's repository keeps tokenizer.model at its top and the weights in checkpoints/ckpt-0."""
    root, *_ = release
    repo = tmp_path / "grok-1"
    _copy(root, repo / "checkpoints")
    (repo / "checkpoints/tokenizer.model").rename(repo / "tokenizer.model")
    model = edgerun.load(repo / "checkpoints")
    assert model.tokenizer.vocab_size == 131072
    (repo / "tokenizer.model").unlink()
    with pytest.raises(edgerun.EdgerunError, match="no tokenizer.model beside .*ckpt-0"):
        edgerun.load(repo / "checkpoints")


# --- bad input: one clear line, nothing written ------------------------------------------------------------

def _convert_fails(src: Path, tmp_path: Path, match: str) -> str:
    dst = tmp_path / "out"
    with pytest.raises(edgerun.CheckpointError, match=match) as e:
        convert(src, dst, quant="q8", progress=False)
    assert not dst.exists() and not dst.with_name("out.partial").exists()
    assert "\n" not in str(e.value)
    return str(e.value)


class _Opens:
    """Unpickling this calls open(path, "w"), which creates path."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    marker = tmp_path / "ran"
    evil = pickle.dumps(_Opens(str(marker)), protocol=4)
    pickle.loads(evil)  # what pickle.load would do: the file is really made to run code
    assert marker.exists()
    marker.unlink()
    (src / "ckpt-0/tensor00003_000").write_bytes(evil)
    message = _convert_fails(src, tmp_path, r"tensor00003_000 refers to io\.open")
    assert "refusing" in message and not marker.exists()
    with pytest.raises(edgerun.CheckpointError, match="io.open"):
        edgerun.load(src)
    assert not marker.exists()


def test_code_hidden_inside_a_quantized_record_is_refused(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    record = pickle.loads((src / "ckpt-0/tensor00002_000").read_bytes())  # the writer's own record class
    record.scales = _Opens(str(tmp_path / "ran"))
    (src / "ckpt-0/tensor00002_000").write_bytes(pickle.dumps(record, protocol=4))
    _convert_fails(src, tmp_path, "refers to io.open")
    assert not (tmp_path / "ran").exists()


def test_a_truncated_file_is_named(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    f = src / "ckpt-0/tensor00004_000"  # decoder_layer_0's moe/linear_v: the experts' up matrices
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _convert_fails(src, tmp_path, r"tensor00004_000 is cut short")


def test_a_missing_file_is_named(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    (src / "ckpt-0/tensor00030_000").unlink()
    _convert_fails(src, tmp_path, r"lacks tensor00030_000 \(transformer/decoder_layer_10/")


def test_a_file_of_the_wrong_shape_is_named(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    (src / "ckpt-0/tensor00009_000").write_bytes(pickle.dumps(np.ones(65, np.float32), protocol=4))
    _convert_fails(src, tmp_path, r"tensor00009_000 holds float32 \[65\] where parameter 9 "
                                  r"\(transformer/decoder_layer_0/rms_norm/scale\) should be a float array \[64\]")


def test_without_a_config_the_files_must_be_the_released_model(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    (src / "grok1_config.json").unlink()
    # 2 + 12 * 12 files where the released model has 770: the message says how to describe another size
    _convert_fails(src, tmp_path, r"holds 146 parameter files \(tensor00000_000 to tensor00145_000\) where the "
                                  r"released Grok-1 \(64 layers\) has 770; for another size put grok1_config.json "
                                  r"beside ckpt-0")


def test_a_bad_grok1_config_is_one_line(release, tmp_path):
    root, *_ = release
    src = _copy(root, tmp_path / "r")
    cfg = json.loads((src / "grok1_config.json").read_text())
    del cfg["model"]["num_layers"]
    (src / "grok1_config.json").write_text(json.dumps(cfg))
    _convert_fails(src, tmp_path, "grok1_config.json lacks num_layers")


def test_an_interrupted_conversion_resumes_to_the_same_store(release, tmp_path):
    root, *_ = release
    whole = convert(root, tmp_path / "whole", quant="q4", progress=False)

    def stop(item: str):
        if item == "expert/3/5":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(root, tmp_path / "resumed", quant="q4", progress=False, on_item=stop)
    convert(root, tmp_path / "resumed", quant="q4", progress=False)
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "resumed") for p in (tmp_path / "resumed").rglob("*")
                           if p.is_file())
    for f in files:
        assert (whole / f).read_bytes() == (tmp_path / "resumed" / f).read_bytes(), f


def test_one_expert_is_read_without_the_rest(release):
    """An expert's rows of a stacked [E, in, out] weight come from one ranged read of its own bytes."""
    root, *_ = release
    stored = read_pickle(root / "ckpt-0/tensor00002_000")  # decoder_layer_0's moe/linear
    whole = stored.weight.read()
    assert torch.equal(stored.weight.read(5, 6)[0], whole[5])
    assert stored.weight.data.nbytes == whole.numel()  # located, not held in memory


def test_plan_reads_the_release_sizes(release, tmp_path):
    from edgerun.commands.plan import read_model

    root, *_ = release
    config, experts, dense, _ = read_model(root / "ckpt-0", "q4", "q8")
    assert (config["num_hidden_layers"], config["intermediate_size"], experts) == (LAYERS, 96, "q4")
    src = _copy(root, tmp_path / "r")
    (src / "grok1_config.json").unlink()  # the released sizes, from run.py
    config, *_ = read_model(src, "q4", "q8")
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (64, 6144, 32768)


def test_the_release_by_repo_id_from_the_local_hf_cache(release, tmp_path, monkeypatch):
    """`huggingface-cli download xai-org/grok-1` keeps ckpt-0/ and tokenizer.model in the HF cache's snapshot."""
    root, *_ = release
    repo = tmp_path / "hub" / "models--xai-org--grok-1"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _copy(root, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    model = edgerun.load("xai-org/grok-1", dtype="float32")
    assert model.path == repo / "snapshots" / commit
    assert np.array_equal(model.logits(PROMPT), edgerun.load(root, dtype="float32").logits(PROMPT))
