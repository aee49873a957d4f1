"""The packaged demo model (trained by training/train_demo.py on Tiny Shakespeare) and the training script."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import edgerun
from edgerun.demo_model import demo_model_dir, describe

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "training" / "tinyshakespeare.txt"
SLICE = 1024  # held-out tokens scored by the perplexity tests
CONTEXT = 256  # the model's context: evaluation windows of <s> and 255 tokens
# edgerun keeps one position free for a generated token, so a full window needs one more
LOAD = {"context_length": CONTEXT + 1}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo", ROOT / "training" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


td = _load_script()


@pytest.fixture(scope="module")
def demo():
    return edgerun.load(demo_model_dir(), **LOAD)


@pytest.fixture(scope="module")
def heldout(demo):
    train_text, held_text = td.split_text(TEXT.read_text(encoding="utf-8"))
    enc = lambda t: demo.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    train_ids, _ = td.encode(enc, train_text)
    held_ids, _ = td.encode(enc, held_text)
    return train_ids, held_ids[:SLICE]


def _ppl(model, ids: np.ndarray) -> float:
    ppl, scored = td.perplexity(model.logits, ids, context=CONTEXT, stride=128)
    assert scored == len(ids)  # every token scored exactly once
    return ppl


def test_demo_model_is_packaged_and_described():
    path = demo_model_dir()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "metrics.json"):
        assert (path / name).is_file(), name
    assert json.loads((path / "config.json").read_text())["model_type"] == "mixtral"
    line = describe(path)
    assert "Tiny Shakespeare" in line and "8 experts" in line and "\n" not in line


def test_heldout_perplexity_beats_a_unigram_model(demo, heldout):
    train_ids, ids = heldout
    ppl = _ppl(demo, ids)
    # The bound: a unigram model fitted to the training part (add-one smoothing) is about the best any
    # predictor that ignores the context can do; random weights ignore it (and are not even calibrated to
    # token frequencies: their perplexity is near the vocabulary size). Halving the unigram perplexity
    # needs what was learned from the context.
    counts = np.bincount(train_ids, minlength=demo.spec.vocab_size) + 1.0
    unigram = math.exp(-np.mean(np.log(counts[ids] / counts.sum())))
    assert unigram > 100
    assert ppl < unigram / 2, (ppl, unigram)  # measured: 49.7 against 483 (random weights: about 4100)
    assert ppl < demo.spec.vocab_size / 20


def test_quantized_stores_stay_close_to_float(demo, heldout):
    _, ids = heldout
    base = _ppl(demo, ids)
    q8 = _ppl(edgerun.load(demo_model_dir(), quant="q8", **LOAD), ids)
    q4 = _ppl(edgerun.load(demo_model_dir(), quant="q4", **LOAD), ids)
    # measured on this slice: float 49.75, q8 49.76, q4 49.57
    assert abs(q8 / base - 1) < 0.005, (base, q8)
    assert abs(q4 / base - 1) < 0.02, (base, q4)


def test_logits_match_transformers(demo, heldout):
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(demo_model_dir(), dtype=torch.float32, attn_implementation="eager")
    ids = [td.BOS] + heldout[1][:200].tolist()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = demo.logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # measured 1.3e-5 against logits up to 21
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_chat_template_and_replies_end_with_eos(demo):
    tok = demo.tokenizer
    messages = [{"role": "system", "content": "A street in Verona."},
                {"role": "user", "content": " Good morrow, fair Juliet. \n"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<s>Chorus:\nA street in Verona.</s>\n\nROMEO:\nGood morrow, fair Juliet.</s>\n\nJULIET:\n")
    named = tok.apply_chat_template([{"role": "user", "name": "First Citizen", "content": "Hear me."}],
                                   add_generation_prompt=False)
    assert named == "<s>First Citizen:\nHear me.</s>"
    for seed in range(3):
        reply = demo.chat(messages[1:], max_new_tokens=200, seed=seed)
        stats = demo.stats()
        assert stats["finish_reason"] == "stop" and stats["generated_tokens"] < 200  # the model wrote </s>
        assert reply.strip()


def test_data_preparation():
    text = TEXT.read_text(encoding="utf-8")
    train_text, held_text = td.split_text(text)
    assert train_text + held_text == text
    assert len(train_text) >= 0.9 * len(text) and held_text.startswith("\n\n")
    assert td.with_eos("A:\nx\ny\n\n\nB:\nz\n") == "A:\nx\ny</s>\n\nB:\nz</s>"
    tok = td.train_tokenizer(train_text[:20000], 300)
    ids, starts = td.encode(lambda t: tok.encode(t, add_special_tokens=False).ids, train_text[:20000])
    assert ids[-1] == td.EOS and (ids == td.EOS).sum() == len(starts) == len(td.speeches(train_text[:20000]))
    for s in starts[:50]:  # every start is a speaker's name, right after </s> and a blank line
        head = tok.decode(ids[s:s + 40].tolist())
        assert "\n" in head and head.split("\n")[0].endswith(":"), head
        assert s == 0 or tok.decode(ids[s - 3:s].tolist(), skip_special_tokens=False) == "</s>\n\n"
    assert list(td.eval_windows(10, context=5, stride=2)) == [(0, 4, 0), (2, 6, 4), (4, 8, 6), (6, 10, 8)]


def test_committed_tokenizer_is_the_scripts():
    # the script's tokenizer training is deterministic: retraining gives the committed tokenizer.json, and its
    # tokenizer_config.json is the one the script writes
    train_text, _ = td.split_text(TEXT.read_text(encoding="utf-8"))
    tok = td.train_tokenizer(train_text, 4096)
    path = demo_model_dir()
    assert json.loads(tok.to_str()) == json.loads((path / "tokenizer.json").read_text())
    assert json.loads((path / "tokenizer_config.json").read_text()) == td.tokenizer_config(CONTEXT)


def test_training_script_end_to_end(tmp_path):
    data = tmp_path / "plays.txt"
    data.write_text(TEXT.read_text(encoding="utf-8")[:60000])
    out = tmp_path / "model"
    common = ["--data", str(data), "--out", str(out), "--stride", "16", "--eval-tokens", "64"]
    assert td.main(common + ["--vocab", "300", "--hidden", "32", "--inter", "32", "--layers", "1",
                             "--context", "32", "--batch", "2", "--steps", "3", "--warmup", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["vocab_size"] == 300 and metrics["parameters"] > 0
    assert td.main(common + ["--eval", "--quants", "float", "q4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ppl = metrics["heldout_perplexity"]
    # the float model through edgerun scores what transformers scored when training ended
    assert ppl["edgerun_float_first64"] == pytest.approx(ppl["transformers_float32_first64"], rel=1e-3)
    assert ppl["edgerun_q4_first64"] > 1
    model = edgerun.load(out)
    assert model.spec.num_experts == 8 and model.context_length == 32
    assert model.tokenizer.eos_id == td.EOS and model.tokenizer.bos_id == td.BOS
    assert isinstance(model.chat([{"role": "user", "content": "Hail."}], max_new_tokens=4, seed=0), str)
