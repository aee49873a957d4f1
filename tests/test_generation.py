"""Text generation end to end: tokenizer + model + sampling + stop handling, against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import edgerun
from edgerun.api import _find_stop
from edgerun.cli import main
from edgerun.errors import GenerationError
from edgerun.runtime.sampling import Sampler, SamplingParams
from hf_models import build, hf_greedy, save

MIXTRAL_TOKENIZER = Path(__file__).parent / "data" / "mixtral-8x7b-tokenizer.model"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny random Mixtral with the real 32000-token Mixtral tokenizer and a chat template."""
    hf = build("mixtral", vocab_size=32000)
    path = save(hf, tmp_path_factory.mktemp("text") / "m")
    shutil.copyfile(MIXTRAL_TOKENIZER, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": TEMPLATE}))
    return hf, path


def test_generate_matches_transformers_greedy(text_model):
    hf, path = text_model
    model = edgerun.load(path)
    prompt = "Once upon a time"
    ids = model.tokenizer.encode(prompt)
    assert ids[0] == 1  # BOS
    want = model.tokenizer.decode(hf_greedy(hf, ids, 12))
    assert model.generate(prompt, max_new_tokens=12, temperature=0) == want
    assert "".join(model.stream(prompt, max_new_tokens=12, temperature=0)) == want
    stats = model.stats()
    assert stats["generated_tokens"] == 12 and stats["finish_reason"] == "length"
    assert stats["prefill_tokens_per_s"] > 0 and stats["decode_tokens_per_s"] > 0


def test_chat_uses_the_template(text_model):
    hf, path = text_model
    model = edgerun.load(path)
    messages = [{"role": "user", "content": "Hi there"}]
    ids = model.tokenizer.encode("<s>[INST] Hi there [/INST]", add_special_tokens=False)
    assert ids.count(1) == 1  # BOS written once, by the template
    assert model.chat(messages, max_new_tokens=8, temperature=0) == model.tokenizer.decode(hf_greedy(hf, ids, 8))
    # the next turn extends the conversation and reuses the cached prefix
    reply = model.chat(messages, max_new_tokens=8, temperature=0)
    follow = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]
    model.chat(follow, max_new_tokens=4, temperature=0)
    assert model.stats()["cached_prompt_tokens"] >= len(ids)


def test_stop_strings_cut_the_output(text_model):
    _, path = text_model
    model = edgerun.load(path)
    full = model.generate("The", max_new_tokens=20, temperature=0)
    stop = full[5:8]
    assert stop and full.find(stop) == 5
    cut = model.generate("The", max_new_tokens=20, temperature=0, stop=[stop, "never-there"])
    assert cut == full[:5]
    assert model.stats()["finish_reason"] == "stop"
    pieces = list(model.stream("The", max_new_tokens=20, temperature=0, stop=stop))
    assert "".join(pieces) == full[:5]


def test_eos_ends_generation(text_model):
    _, path = text_model
    model = edgerun.load(path)
    first = model.generate_ids([1, 415, 28705], 1, temperature=0)[0]
    # declaring the greedy next token an end-of-sequence id stops before it
    model._generation_config["eos_token_id"] = [first]
    assert model.generate_ids([1, 415, 28705], 5, temperature=0) == []
    assert model.stats()["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(text_model):
    _, path = text_model
    model = edgerun.load(path)
    a = model.generate_ids([1, 415], 10, temperature=1.0, seed=7, ignore_eos=True)
    b = model.generate_ids([1, 415], 10, temperature=1.0, seed=7, ignore_eos=True)
    c = model.generate_ids([1, 415], 10, temperature=1.0, seed=8, ignore_eos=True)
    assert a == b and a != c
    # top_k=1 is greedy whatever the temperature
    assert model.generate_ids([1, 415], 6, temperature=5.0, top_k=1, seed=1, ignore_eos=True) == \
        model.generate_ids([1, 415], 6, temperature=0, ignore_eos=True)


def draw(params: SamplingParams, logits, n=400, history=()):
    sampler = Sampler(params)
    return [sampler(torch.tensor(logits, dtype=torch.float32), list(history)) for _ in range(n)]


def test_sampler_filters():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])).tolist()
    assert set(draw(SamplingParams(temperature=1, top_k=2, seed=0), logits)) == {0, 1}
    # top_p=0.6: the smallest set reaching 0.6 is {0, 1}; top_p=0.75 adds token 2
    assert set(draw(SamplingParams(temperature=1, top_p=0.6, seed=0), logits)) == {0, 1}
    assert set(draw(SamplingParams(temperature=1, top_p=0.75, seed=0), logits)) == {0, 1, 2}
    # min_p=0.3: tokens below 0.3 * 0.4 = 0.12 are dropped
    assert set(draw(SamplingParams(temperature=1, min_p=0.3, seed=0), logits)) == {0, 1, 2}
    # with no filter every token appears, roughly in proportion
    counts = torch.bincount(torch.tensor(draw(SamplingParams(temperature=1, seed=0), logits, n=4000)), minlength=5)
    assert torch.allclose(counts / 4000.0, torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]), atol=0.03)
    # a very low temperature is (nearly) greedy
    assert set(draw(SamplingParams(temperature=0.01, seed=0), logits)) == {0}
    # logits that are not numbers give a clear error, not a token
    with pytest.raises(GenerationError, match="cannot sample: the next token's probabilities sum to nan"):
        draw(SamplingParams(temperature=1, seed=0), [float("nan")] * 5, n=1)


def test_repetition_penalty():
    logits = [2.0, 1.9, -1.0, -1.05]
    assert draw(SamplingParams(), logits, n=1) == [0]
    # token 0 has been seen: 2.0 / 1.5 < 1.9, so token 1 wins; negatives are pushed further down
    assert draw(SamplingParams(repetition_penalty=1.5), logits, n=1, history=[0]) == [1]
    assert draw(SamplingParams(repetition_penalty=1.5), [-1.0, -1.05], n=1, history=[0]) == [1]


def test_find_stop_holds_back_partial_matches():
    assert _find_stop("hello wor", 0, ["world"]) == (None, 6)  # "wor" might start "world"
    assert _find_stop("hello world!", 0, ["world"]) == (6, 12)
    assert _find_stop("abc", 0, []) == (None, 3)
    assert _find_stop("xx<|e", 0, ["<|end|>", "zz"]) == (None, 2)


def test_demo_command(capsys):
    assert main(["demo", "-n", "12", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert "trained on Tiny Shakespeare" in err and "tok/s" in err
    figures = err.strip().splitlines()[-1]  # the reply ends by itself (stop) or after the 12 tokens asked for
    assert figures.startswith("[12 tokens, length") or " tokens, stop " in figures
    assert out.strip()


def test_run_command_streams_and_reports(text_model, capsys):
    _, path = text_model
    assert main(["run", str(path), "-p", "Once upon a time", "-n", "12", "--temp", "0"]) == 0
    out, err = capsys.readouterr()
    model = edgerun.load(path)
    assert out.rstrip("\n") == model.generate("Once upon a time", max_new_tokens=12, temperature=0)
    assert "decode" in err and "tok/s" in err
    assert main(["run", str(path), "--chat", "--system", "Be brief.", "-p", "Hi", "-n", "4", "--temp", "0"]) == 0
