"""Tokenizer: loading, encoding against independent references, decoding, streaming and chat templates.

Runs on the real tokenizers of Grok-1 and Mixtral-8x7B (SentencePiece) and OLMoE (tokenizer.json)
kept in tests/data.
"""

from __future__ import annotations

import datetime
import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece

from edgerun.checkpoint import tokenizer as tokenizer_module
from edgerun.checkpoint.tokenizer import Tokenizer
from edgerun.errors import TokenizerError

DATA = Path(__file__).parent / "data"
GROK = DATA / "grok-1-tokenizer.model"
MIXTRAL = DATA / "mixtral-8x7b-tokenizer.model"
OLMOE = DATA / "olmoe-tokenizer.json"

TEXTS = [
    "Hello, world!",
    "Crème brûlée à la façon de Noël",
    "東京は日本の首都です。你好，世界",
    "Emoji: 😀👍🏽 and a family 👩‍👩‍👧",
    "مرحبا بالعالم",
    "line one\nline two\n\n\tindented",
    "several     spaces   here ",
]
# Texts whose characters are spread over several tokens (byte fallback / byte-level BPE).
MULTIBYTE_TEXTS = ["Emoji: 😀👍🏽 and a family 👩‍👩‍👧🍎", "東京は日本の首都です。你好，世界 😀", "Ελληνικά 🚀 한국어"]

# Mixtral-style: BOS, [INST] turns, a system message folded into the first user turn.
MIXTRAL_TEMPLATE = """{%- set ns = namespace(system='') -%}
{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- set ns.system = message['content'] + '\\n\\n' %}
    {%- elif message['role'] == 'user' %}
        {{- '[INST] ' + ns.system + message['content'] + ' [/INST]' }}
        {%- set ns.system = '' %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
"""

# ChatML, written with block tags on their own (indented) lines so that trim_blocks and
# lstrip_blocks matter, plus tools through tojson and a loop control.
CHATML_TEMPLATE = """{% if tools %}
<|im_start|>system
Tools:
{{ tools | tojson(indent=2) }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'note' %}
        {% continue %}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

MIXTRAL_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    # Older configs serialize special tokens as AddedToken objects.
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False, "special": True},
    "unk_token": "<unk>",
    "pad_token": None,
    "legacy": True,
    "tokenizer_class": "LlamaTokenizer",
    "added_tokens_decoder": {
        "0": {"content": "<unk>", "special": True},
        "1": {"content": "<s>", "special": True},
        "2": {"content": "</s>", "special": True},
    },
    "chat_template": MIXTRAL_TEMPLATE,
}

OLMOE_CONFIG = {
    "bos_token": None,
    "eos_token": "<|endoftext|>",
    "pad_token": "<|padding|>",
    "chat_template": CHATML_TEMPLATE,
}

CONVERSATION = [
    {"role": "system", "content": "Réponds en français."},
    {"role": "user", "content": "Bonjour ! 😀"},
    {"role": "assistant", "content": "Salut, ça va ?"},
    {"role": "user", "content": "Très bien, 谢谢."},
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "météo",
            "description": "Donne la météo à Zürich",
            "parameters": {"type": "object", "properties": {"ville": {"type": "string"}}},
        },
    }
]


def model_dir(root: Path, source: Path, config: dict | None = None, template: str | None = None) -> Path:
    """A model directory holding `source` under its canonical name, plus optional config files."""
    root.mkdir(parents=True, exist_ok=True)
    target = "tokenizer.json" if source.suffix == ".json" else "tokenizer.model"
    shutil.copyfile(source, root / target)
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if template is not None:
        (root / "chat_template.jinja").write_text(template, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "grok": model_dir(root / "grok", GROK),
        "mixtral_bare": model_dir(root / "mixtral_bare", MIXTRAL),
        "mixtral": model_dir(root / "mixtral", MIXTRAL, MIXTRAL_CONFIG),
        "olmoe_bare": model_dir(root / "olmoe_bare", OLMOE),
        "olmoe": model_dir(root / "olmoe", OLMOE, OLMOE_CONFIG),
    }


@pytest.fixture(scope="module")
def toks(dirs) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(path) for name, path in dirs.items()}


@pytest.fixture(scope="module")
def hf_mixtral(dirs):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(dirs["mixtral"])


@pytest.fixture(scope="module")
def hf_olmoe(dirs):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(dirs["olmoe"])


def sp_processor(path: Path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


# ---------------------------------------------------------------- loading


def test_real_tokenizers_load_with_their_vocab_sizes(toks):
    olmoe = json.loads(OLMOE.read_text(encoding="utf-8"))
    olmoe_ids = set(olmoe["model"]["vocab"].values()) | {t["id"] for t in olmoe["added_tokens"]}
    assert toks["grok"].vocab_size == 131072
    assert toks["mixtral_bare"].vocab_size == 32000
    assert toks["olmoe_bare"].vocab_size == len(olmoe_ids) == max(olmoe_ids) + 1 == 50280


def test_special_tokens_come_from_the_model_without_a_config(toks):
    grok, mixtral, olmoe = toks["grok"], toks["mixtral_bare"], toks["olmoe_bare"]
    assert (grok.bos_token, grok.bos_id, grok.eos_token, grok.eos_id) == ("[BOS]", 1, "[EOS]", 2)
    assert (mixtral.bos_token, mixtral.bos_id, mixtral.eos_token, mixtral.eos_id) == ("<s>", 1, "</s>", 2)
    assert (olmoe.bos_token, olmoe.bos_id, olmoe.eos_token, olmoe.eos_id) == (None, None, None, None)
    assert not any(t.has_chat_template for t in (grok, mixtral, olmoe))


def test_special_tokens_come_from_the_config(toks):
    mixtral, olmoe = toks["mixtral"], toks["olmoe"]
    assert (mixtral.bos_token, mixtral.bos_id, mixtral.eos_token, mixtral.eos_id) == ("<s>", 1, "</s>", 2)
    assert (olmoe.bos_token, olmoe.bos_id, olmoe.eos_token, olmoe.eos_id) == (None, None, "<|endoftext|>", 0)
    assert mixtral.has_chat_template and olmoe.has_chat_template


def test_tokenizer_json_is_preferred_over_tokenizer_model(tmp_path):
    model_dir(tmp_path, MIXTRAL)
    shutil.copyfile(OLMOE, tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).vocab_size == 50280


def test_token_to_id(toks):
    assert toks["mixtral"].token_to_id("▁Hello") == 22557
    assert toks["mixtral"].token_to_id("<s>") == 1
    assert toks["mixtral"].token_to_id("<unk>") == 0
    assert toks["mixtral"].token_to_id("no such token") is None
    assert toks["grok"].token_to_id("[EOS]") == 2
    assert toks["olmoe"].token_to_id("<|endoftext|>") == 0
    assert toks["olmoe"].token_to_id("no such token") is None


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("name, path", [("grok", GROK), ("mixtral_bare", MIXTRAL), ("mixtral", MIXTRAL)])
def test_sentencepiece_encoding_matches_sentencepiece(toks, name, path):
    sp = sp_processor(path)
    tok = toks[name]
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.encode(text) == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


def test_mixtral_matches_transformers(toks, hf_mixtral):
    prompt = "<s>[INST] What is 2+2? [/INST] 4</s>[INST] And 3+3? [/INST]"
    for text in [*TEXTS, prompt]:
        ids = toks["mixtral"].encode(text)
        assert ids == hf_mixtral.encode(text), text
        for skip in (True, False):
            assert toks["mixtral"].decode(ids, skip) == hf_mixtral.decode(ids, skip_special_tokens=skip), text


def test_olmoe_matches_transformers(toks):
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(OLMOE))
    for text in [*TEXTS, "end<|endoftext|>next<|padding|>"]:
        for add in (True, False):
            ids = toks["olmoe_bare"].encode(text, add_special_tokens=add)
            assert ids == reference.encode(text, add_special_tokens=add), text
        for skip in (True, False):
            assert toks["olmoe_bare"].decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip)
    assert toks["olmoe_bare"].encode("a<|endoftext|>")[-1] == 0


def test_special_tokens_in_text_map_to_their_ids(toks):
    sp = sp_processor(MIXTRAL)
    ids = toks["mixtral"].encode("Hi</s>there<unk>", add_special_tokens=False)
    assert ids == [*sp.encode("Hi"), 2, *sp.encode("there"), 0]
    # Control pieces are recognised even with no tokenizer_config.json.
    assert toks["grok"].encode("a[EOS]", add_special_tokens=False) == [*sp_processor(GROK).encode("a"), 2]


def test_bos_and_eos_follow_the_config(tmp_path):
    sp = sp_processor(MIXTRAL)
    config = {**MIXTRAL_CONFIG, "add_bos_token": False, "add_eos_token": True}
    tok = Tokenizer.from_dir(model_dir(tmp_path, MIXTRAL, config))
    assert tok.encode("Hello") == [*sp.encode("Hello"), 2]
    assert tok.encode("Hello", add_special_tokens=False) == sp.encode("Hello")


def test_added_tokens_from_the_config(tmp_path):
    config = {
        **MIXTRAL_CONFIG,
        "added_tokens_decoder": {
            **MIXTRAL_CONFIG["added_tokens_decoder"],
            "32000": {"content": "<|im_end|>", "special": True},
            "32001": {"content": "<tool>", "special": False},
        },
    }
    tok = Tokenizer.from_dir(model_dir(tmp_path, MIXTRAL, config))
    sp = sp_processor(MIXTRAL)
    assert tok.vocab_size == 32002
    assert tok.token_to_id("<|im_end|>") == 32000
    ids = tok.encode("Hi<|im_end|><tool>", add_special_tokens=False)
    assert ids == [*sp.encode("Hi"), 32000, 32001]
    assert tok.decode(ids) == "Hi<tool>"
    assert tok.decode(ids, skip_special_tokens=False) == "Hi<|im_end|><tool>"


def test_named_tokens_are_special(tmp_path):
    # The config's eos_token is special even where the model or added_tokens_decoder does not say so.
    config = {
        "eos_token": "<|im_end|>",
        "pad_token": "Hello",
        "added_tokens_decoder": {"32000": {"content": "<|im_end|>", "special": False}},
    }
    tok = Tokenizer.from_dir(model_dir(tmp_path, MIXTRAL, config))
    assert tok.eos_id == 32000
    ids = tok.encode("Hi<|im_end|>", add_special_tokens=False)
    assert ids[-1] == 32000 and tok.decode(ids) == "Hi"
    # An ordinary piece named as a special token is split out of the text like any special token.
    sp = sp_processor(MIXTRAL)
    ids = tok.encode("abcHelloxyz", add_special_tokens=False)
    assert 16230 not in sp.encode("abcHelloxyz")
    assert ids == [*sp.encode("abc"), 16230, *sp.encode("xyz")] and tok.decode(ids) == "abc xyz"


def test_mixtral_prompt_encodes_special_tokens_as_ids(toks, hf_mixtral):
    tok = toks["mixtral"]
    prompt = tok.apply_chat_template(CONVERSATION[1:3] + [{"role": "user", "content": "Encore ?"}])
    assert prompt == "<s>[INST] Bonjour ! 😀 [/INST] Salut, ça va ?</s>[INST] Encore ? [/INST]"
    ids = tok.encode(prompt, add_special_tokens=False)
    sp = sp_processor(MIXTRAL)
    expected = [
        1, *sp.encode("[INST] Bonjour ! 😀 [/INST] Salut, ça va ?"), 2, *sp.encode("[INST] Encore ? [/INST]")
    ]
    assert ids == expected
    assert ids.count(1) == 1 and ids.count(2) == 1
    assert ids == hf_mixtral.encode(prompt, add_special_tokens=False)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["grok", "mixtral", "olmoe"])
def test_round_trip_of_non_ascii_text(toks, name):
    tok = toks[name]
    for text in [*TEXTS, *MULTIBYTE_TEXTS, "  two leading spaces", "\nnewline first"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_decode_renders_or_skips_special_tokens(toks):
    # The text after a special token is encoded on its own, so it starts a new word.
    ids = toks["mixtral"].encode("Hello</s>world")
    assert toks["mixtral"].decode(ids) == "Hello world"
    assert toks["mixtral"].decode(ids, skip_special_tokens=False) == "<s> Hello</s> world"
    assert toks["grok"].decode(toks["grok"].encode("Hi"), skip_special_tokens=False) == "[BOS] Hi"


def test_decode_ignores_ids_outside_the_vocabulary(toks):
    for tok in (toks["mixtral"], toks["olmoe"]):
        ids = tok.encode("Hello", add_special_tokens=False)
        assert tok.decode([*ids, tok.vocab_size + 5, -1]) == "Hello"


# ---------------------------------------------------------------- streaming


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[str], str]:
    decoder = tok.stream_decoder(skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("name", ["grok", "mixtral", "olmoe"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_matches_decode_and_never_splits_characters(toks, name, skip):
    tok = toks[name]
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text)
        pieces, tail = stream(tok, ids, skip)
        assert "".join(pieces) + tail == tok.decode(ids, skip)
        assert not any("\ufffd" in piece for piece in pieces), pieces
        assert tail == ""
        # Text is released while streaming, not all at the end.
        assert sum(1 for piece in pieces if piece) > len(text) // 4


def test_stream_decoder_waits_for_whole_characters(toks):
    # Grok spells emoji as byte-fallback pieces: the emoji must appear at once, when its last byte arrives.
    tok = toks["grok"]
    ids = tok.encode("a 😀", add_special_tokens=False)
    assert ids[-4:] == [tok.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    pieces, tail = stream(tok, ids)
    assert pieces[-1] == "😀" and not any(pieces[-4:-1]) and tail == ""
    # OLMoE's byte-level BPE splits the same emoji over several tokens.
    tok = toks["olmoe"]
    ids = tok.encode("a 😀")
    assert len(tok.encode("😀")) > 1
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "a 😀" and pieces[-1].endswith("😀") and tail == ""


def test_stream_decoder_keeps_word_boundary_spaces(toks):
    tok = toks["mixtral"]
    ids = tok.encode("Hello world foo")
    pieces, tail = stream(tok, ids)
    assert pieces == ["", "Hello", " world", " foo"] and tail == ""
    decoder = tok.stream_decoder()
    decoder.push(tok.token_to_id("▁Hello"))
    assert decoder.push(tok.token_to_id("▁foo")) == " foo"


def test_stream_decoder_flush_returns_an_incomplete_character(toks):
    tok = toks["grok"]
    ids = tok.encode("ok 😀", add_special_tokens=False)[:-1]
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) == "ok "
    assert tail == tok.decode(ids)[len("ok ") :] and tail.endswith("\ufffd")


@pytest.mark.parametrize("name", ["grok", "mixtral", "olmoe"])
def test_stream_decoder_on_arbitrary_ids(toks, name):
    tok = toks[name]
    rng = random.Random(1234)
    for _ in range(60):
        # Low ids are where byte pieces and control tokens live.
        ids = [rng.choice([rng.randrange(300), rng.randrange(tok.vocab_size)]) for _ in range(rng.randrange(1, 30))]
        for skip in (True, False):
            pieces, tail = stream(tok, ids, skip)
            assert "".join(pieces) + tail == tok.decode(ids, skip), ids


@pytest.mark.parametrize("name", ["grok", "olmoe"])
def test_stream_decoder_decodes_only_a_short_window(toks, name, monkeypatch):
    tok = toks[name]
    ids = tok.encode("Streaming text 😀 東京 " * 200)
    expected = tok.decode(ids)
    lengths: list[int] = []
    decode = tok.decode

    def recording_decode(window, skip_special_tokens=True):
        lengths.append(len(window))
        return decode(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", recording_decode)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == expected
    assert len(ids) > 1000 and max(lengths) <= 8


# ---------------------------------------------------------------- chat templates


def test_mixtral_style_template_matches_transformers(toks, hf_mixtral):
    rendered = toks["mixtral"].apply_chat_template(CONVERSATION)
    assert rendered == (
        "<s>[INST] Réponds en français.\n\nBonjour ! 😀 [/INST] Salut, ça va ?</s>[INST] Très bien, 谢谢. [/INST]"
    )
    assert rendered == hf_mixtral.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_chatml_template_matches_transformers(toks, hf_olmoe):
    tok = toks["olmoe"]
    messages = [*CONVERSATION[:2], {"role": "note", "content": "dropped"}, *CONVERSATION[2:]]
    for generation_prompt in (True, False):
        for tools in (None, TOOLS):
            extra = {"tools": tools} if tools else {}
            ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **extra)
            theirs = hf_olmoe.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt, tools=tools
            )
            assert ours == theirs
    rendered = tok.apply_chat_template(messages[:2])
    assert rendered == (
        "<|im_start|>system\nRéponds en français.<|im_end|>\n"
        "<|im_start|>user\nBonjour ! 😀<|im_end|>\n<|im_start|>assistant\n"
    )
    with_tools = tok.apply_chat_template(messages[:2], tools=TOOLS)
    assert with_tools.startswith(f"<|im_start|>system\nTools:\n{json.dumps(TOOLS, indent=2, ensure_ascii=False)}")
    assert "dropped" not in tok.apply_chat_template(messages)


def test_template_globals_and_tojson(tmp_path):
    template = "{{ strftime_now('%Y') }}|{{ data | tojson }}|{{ data | tojson(indent=2) }}|{{ flag }}"
    tok = Tokenizer.from_dir(model_dir(tmp_path, OLMOE, template=template))
    out = tok.apply_chat_template([], flag="on", data={"ville": "Zürich <b>"})
    year = datetime.datetime.now().year
    assert out in {
        f'{y}|{{"ville": "Zürich <b>"}}|{{\n  "ville": "Zürich <b>"\n}}|on' for y in (year, year + 1)
    }


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path, OLMOE, OLMOE_CONFIG, template="FILE {{ messages | length }}"))
    assert tok.apply_chat_template(CONVERSATION) == "FILE 4"


def test_list_form_chat_template_uses_default(tmp_path):
    config = {
        **OLMOE_CONFIG,
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"},
        ],
    }
    tok = Tokenizer.from_dir(model_dir(tmp_path, OLMOE, config))
    assert tok.apply_chat_template(CONVERSATION) == "DEFAULT Réponds en français."


def test_compiled_template_is_cached(tmp_path, monkeypatch):
    tok = Tokenizer.from_dir(model_dir(tmp_path, MIXTRAL, MIXTRAL_CONFIG))
    compiled = []
    original = tokenizer_module.ImmutableSandboxedEnvironment.from_string

    def counting(self, source, *args, **kwargs):
        compiled.append(source)
        return original(self, source, *args, **kwargs)

    monkeypatch.setattr(tokenizer_module.ImmutableSandboxedEnvironment, "from_string", counting)
    first = tok.apply_chat_template(CONVERSATION)
    assert tok.apply_chat_template(CONVERSATION) == first
    assert compiled == [MIXTRAL_TEMPLATE]


def test_raise_exception_in_template(toks):
    with pytest.raises(TokenizerError, match="Unknown role: tool") as info:
        toks["mixtral"].apply_chat_template([{"role": "tool", "content": "x"}])
    assert "tokenizer_config.json" in str(info.value) and "\n" not in str(info.value)


def test_no_chat_template(toks):
    with pytest.raises(TokenizerError, match="no chat template"):
        toks["olmoe_bare"].apply_chat_template(CONVERSATION)


@pytest.mark.parametrize(
    "messages",
    [
        [{"content": "no role"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        ["just a string"],
    ],
)
def test_bad_messages(toks, messages):
    with pytest.raises(TokenizerError, match="message 0"):
        toks["olmoe"].apply_chat_template(messages)


def test_template_syntax_error(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path, OLMOE, {"chat_template": "{% for m in messages %}{{ m }"}))
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*syntax error"):
        tok.apply_chat_template(CONVERSATION)


def test_template_runtime_error(tmp_path):
    tok = Tokenizer.from_dir(model_dir(tmp_path, OLMOE, template="{{ messages[0]['content'] + 1 }}"))
    with pytest.raises(TokenizerError, match="chat_template.jinja"):
        tok.apply_chat_template(CONVERSATION)


# ---------------------------------------------------------------- bad input


def test_empty_dir(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer in .*expected tokenizer.json, tokenizer.model or ") as info:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_dir(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "absent")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_tokenizer_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(random.Random(7).randrange(256) for _ in range(4096)))
    with pytest.raises(TokenizerError) as info:
        Tokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "JSON object"),
        ('{"bos_token": 5}', "bos_token"),
        ('{"added_tokens_decoder": {"x": {"content": "a"}}}', "added_tokens_decoder"),
        ('{"chat_template": 3}', "chat_template"),
    ],
)
def test_bad_tokenizer_config(tmp_path, content, match):
    model_dir(tmp_path, MIXTRAL)
    (tmp_path / "tokenizer_config.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_dir(tmp_path)
    assert "tokenizer_config.json" in str(info.value)
