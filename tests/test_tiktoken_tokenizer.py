"""Tokenizer on xAI's `tokenizer.tok.json` (Grok-2): loading, encoding against tiktoken itself,
decoding, streaming, the Grok-2 chat format and errors.

The table is a small byte-level BPE trained here on a multilingual text and written in the release's
format: special tokens at the lowest ids (<|pad|> 0, <|separator|> 1, <|eos|> 2, a few controls), the
regular tokens after them (each id doubling as its merge rank) and one more special token at the end.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import regex  # tiktoken's own dependency, for the test's independent pre-tokenizer
import tiktoken

import edgerun
from edgerun.checkpoint.tokenizer import Tokenizer

# The "V1" word split of Grok-2, written out independently of the library: GPT-4's pattern with every
# digit on its own.
V1 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
      r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps, and the fox runs into the forest.
In the morning the fox and the dog meet again; they're friends now, and they'll stay friends.
It's the best of times, it's the worst of times. We've seen the fox, I'm sure, and you'd agree.
THE FOX LIVES ON MAIN STREET, THE DOG ON HIGH STREET: STREET AFTER STREET, THEY'RE NEIGHBOURS.
STREET LIFE, STREET FOOD.
STREET ART.
Der schnelle braune Fuchs springt über den faulen Hund. Die Bäume im Wald sind grün und schön.
Über den Bergen und über den Tälern: Müller, Größe, Straße, fröhlich und müde, schön und grün.
Быстрая коричневая лиса прыгает через ленивую собаку. Лиса и собака, собака и лиса, и снова лиса.
Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο. Η αλεπού και ο σκύλος, ο σκύλος και η αλεπού.
快速的棕色狐狸跳过了懒狗。狐狸和狗是朋友，狗和狐狸是朋友。我们的朋友是狐狸。
素早い茶色の狐が怠惰な犬を飛び越える。狐と犬は友達です。犬と狐は友達です。
الثعلب البني السريع يقفز فوق الكلب الكسول. الثعلب والكلب، الكلب والثعلب.
Emoji time 😀😀 🎉🎉 👍 and more 😀 🎉 in the text 😀.
In 2024 there were 12345 foxes, 678 dogs and 90 birds; in 2023 only 1234 foxes and 12 dogs.
def main():
\tfor i in range(10):
\t\tprint(i, "the fox")
\treturn 0
"""
N_MERGES = 400
# Merges the V1 split can never apply (digits are pre-tokens of their own, and a word never takes the line
# break before it), added to the table on purpose.
UNREACHABLE_TOKENS = [b"12", b"123", b"1234", b"12345", b"\nT"]

FIRST_SPECIALS = ["<|pad|>", "<|separator|>", "<|eos|>", "<|control1|>", "<|control2|>", "<|control704|>"]
LAST_SPECIAL = "<|reserved_3|>"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "They're here; it's fine. THEY'RE HERE, IT'S FINE! I'm, you'll, we've, he'd. O'STREET, X'STREET's",
    "Größe, Straße und Bäume: über alles schön. Ärger, Öl, Übel.",
    "Быстрая коричневая лиса прыгает — ЛИСА, ёжик, Щука.",
    "Η γρήγορη καφέ αλεπού, ΑΛΕΠΟΎ και σκύλος.",
    "快速的棕色狐狸跳过了懒狗。龍と鳳凰、麒麟。",
    "素早い茶色の狐が怠惰な犬を飛び越える。カタカナ、ひらがな。",
    "الثعلب البني السريع يقفز فوق الكلب الكسول.",
    "Emoji: 😀🎉👍🏽 and a family 👩‍👩‍👧 🦊🐉",
    "Numbers 12345, 2024-05-17, 3.14159, ١٢٣ and ²³ and 1,000,000.",
    "def f(x):\n\treturn x  # tabs\n\n\n\twhile True:\r\n\t\tpass\n",
    "several     spaces   here \n  \n trailing   ",
    "The end\nThe next line\r\nThe last line.",
    "",
    " ",
]
SPECIAL_TEXT = "<|control1|>Hello<|separator|>\n\nHuman: schön 😀<|eos|><|pad|><|reserved_3|>龍"
STREAM_TEXT = "Fox 🦊 und Drache 🐉: 龍と鳳凰, 麒麟 — ёж 👩‍👩‍👧 é"


def train_bpe(text: str, n_merges: int) -> list[bytes]:
    """Byte-level BPE learned greedily: the 256 single bytes, then the most frequent pair, merge, repeat."""
    words = Counter(tuple(bytes([b]) for b in w.encode("utf-8")) for w in regex.findall(V1, text))
    vocab = [bytes([b]) for b in range(256)]
    known = set(vocab)
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        candidates = [(n, pair) for pair, n in pairs.items() if pair[0] + pair[1] not in known]
        if not candidates:
            break
        _, (a, b) = max(candidates)
        vocab.append(a + b)
        known.add(a + b)
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab


def write_table(path: Path, ranks: dict[bytes, int], specials: dict[str, int], **extra) -> Path:
    data = {
        "regular_tokens": [{"bytes": list(b), "token": i} for b, i in ranks.items()],
        "special_tokens": [{"bytes": list(s.encode("utf-8")), "token": i} for s, i in specials.items()],
        "word_split": "V1",
        **extra,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.tok.json").write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def table() -> tuple[dict[bytes, int], dict[str, int]]:
    """(regular tokens -> id, special tokens -> id) in the release's layout."""
    vocab = train_bpe(CORPUS, N_MERGES)
    for token in UNREACHABLE_TOKENS:
        assert token[:-1] in vocab and token not in vocab  # a valid merge of two lower-ranked tokens
        vocab.append(token)
    specials = {s: i for i, s in enumerate(FIRST_SPECIALS)}
    ranks = {b: len(specials) + i for i, b in enumerate(vocab)}
    specials[LAST_SPECIAL] = len(specials) + len(ranks)
    return ranks, specials


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, table) -> Path:
    ranks, specials = table
    return write_table(tmp_path_factory.mktemp("grok2"), ranks, specials)


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def reference(table):
    ranks, specials = table
    return tiktoken.Encoding(name="reference", pat_str=V1, mergeable_ranks=ranks, special_tokens=specials)


def split_characters(reference, ids: list[int]) -> int:
    """How many of `ids` are regular tokens that are not whole UTF-8 characters on their own."""
    count = 0
    for i in ids:
        try:
            reference.decode_single_token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            count += 1
    return count


# ---------------------------------------------------------------- loading


def test_the_trained_table_has_many_merges(table):
    ranks, specials = table
    assert len(ranks) > 256 + 300
    assert sorted(ranks.values()) == list(range(len(FIRST_SPECIALS), len(FIRST_SPECIALS) + len(ranks)))
    assert not set(ranks.values()) & set(specials.values())


def test_a_directory_with_only_tok_json_loads(tok_dir, tok, table):
    ranks, specials = table
    assert [p.name for p in tok_dir.iterdir()] == ["tokenizer.tok.json"]
    assert tok.vocab_size == len(ranks) + len(specials)
    assert (tok.eos_token, tok.eos_id) == ("<|eos|>", 2)
    assert (tok.bos_token, tok.bos_id) == (None, None)
    assert tok.chat_stop_ids == {1} == {tok.token_to_id("<|separator|>")}
    assert tok.has_chat_template


def test_vocab_size_from_the_file(tmp_path, table):
    ranks, specials = table
    tok = Tokenizer.from_dir(write_table(tmp_path, ranks, specials, vocab_size=4096))
    assert tok.vocab_size == 4096


def test_token_to_id(tok, table):
    ranks, specials = table
    for name, token_id in specials.items():
        assert tok.token_to_id(name) == token_id
    assert tok.token_to_id(" the") == ranks[b" the"]
    assert tok.token_to_id("A") == ranks[b"A"]
    assert tok.token_to_id("no such token here") is None
    assert tok.token_to_id("<|control3|>") is None


# ---------------------------------------------------------------- encoding and decoding


@pytest.mark.parametrize("text", TEXTS)
def test_encoding_matches_tiktoken_and_round_trips(tok, reference, text):
    ids = tok.encode(text)
    assert ids == reference.encode(text) == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_encoding_matches_tiktoken_on_the_training_text(tok, reference):
    ids = tok.encode(CORPUS)
    assert ids == reference.encode(CORPUS)
    assert tok.decode(ids) == CORPUS
    assert len(ids) < len(CORPUS.encode("utf-8")) / 2


@pytest.mark.parametrize("word", [" the", " fox", " und", " über", " лиса", " αλεπού", "狐狸", "朋友", "\tprint"])
def test_frequent_words_are_merged(tok, table, word):
    ranks, _ = table
    ids = tok.encode(word)
    assert len(ids) < len(word.encode("utf-8"))
    assert any(len(b) > 1 and i in ids for b, i in ranks.items())


def test_digits_are_split_one_per_token(tok, table, tmp_path):
    ranks, specials = table
    digit_ids = [ranks[d.encode()] for d in "12345"]
    assert tok.encode("12345") == digit_ids
    assert tok.encode("x=12345;") == [ranks[b"x"], ranks[b"="], *digit_ids, ranks[b";"]]
    assert ranks[b"12345"] not in tok.encode(CORPUS)
    # The same table with a "pat_str" that keeps digit runs together does use the digit merges.
    grouped = Tokenizer.from_dir(write_table(tmp_path, ranks, specials, pat_str=r"\p{N}+|\P{N}+"))
    assert grouped.encode("12345") == [ranks[b"12345"]]
    assert grouped.encode("1234") == [ranks[b"1234"]]


def test_line_breaks_stay_apart_from_the_next_word(tok, table):
    ranks, _ = table
    ids = tok.encode("end\nThe fox")
    assert ranks[b"\n"] in ids and ranks[b"\nT"] not in ids
    assert tok.decode(ids) == "end\nThe fox"
    assert ranks[b"\nT"] not in tok.encode(CORPUS)


def test_special_tokens_in_text_map_to_their_ids(tok, table, reference):
    _, specials = table
    ids = tok.encode(SPECIAL_TEXT)
    assert ids == reference.encode(SPECIAL_TEXT, allowed_special="all")
    for name, token_id in specials.items():
        if name in SPECIAL_TEXT:
            assert ids.count(token_id) == SPECIAL_TEXT.count(name) == 1
    assert ids[0] == specials["<|control1|>"]
    tail = tok.encode("龍")
    assert ids[-len(tail) - 1:] == [specials[LAST_SPECIAL], *tail]
    # a near-miss of a special token is plain text
    near = tok.encode("<|separator|")
    assert specials["<|separator|>"] not in near and tok.decode(near) == "<|separator|"


def test_decode_renders_or_skips_special_tokens(tok):
    ids = tok.encode(SPECIAL_TEXT)
    assert tok.decode(ids, skip_special_tokens=False) == SPECIAL_TEXT
    plain = SPECIAL_TEXT
    for name in [*FIRST_SPECIALS, LAST_SPECIAL]:
        plain = plain.replace(name, "")
    assert plain == "Hello\n\nHuman: schön 😀龍"
    assert tok.decode(ids) == plain
    assert tok.decode(ids, skip_special_tokens=True) == plain


def test_decode_ignores_ids_outside_the_vocabulary(tok):
    ids = tok.encode("Hello fox")
    assert tok.decode([-1, *ids, tok.vocab_size, 10**9]) == "Hello fox"


def test_no_bos_unless_the_config_names_one(tmp_path, table):
    ranks, specials = table
    write_table(tmp_path, ranks, specials)
    plain = Tokenizer.from_dir(tmp_path)
    assert plain.encode("Hi", add_special_tokens=True) == plain.encode("Hi", add_special_tokens=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|control2|>"}), encoding="utf-8")
    with_bos = Tokenizer.from_dir(tmp_path)
    assert with_bos.bos_id == specials["<|control2|>"]
    assert with_bos.encode("Hi") == [specials["<|control2|>"], *plain.encode("Hi")]
    assert with_bos.encode("Hi", add_special_tokens=False) == plain.encode("Hi")


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_never_splits_characters(tok, reference, skip):
    text = STREAM_TEXT + "<|separator|>\n\n" + STREAM_TEXT
    ids = tok.encode(text)
    assert split_characters(reference, ids) >= 3  # characters spread over several tokens
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # held back at least once, waiting for the rest of a character
    expected = text.replace("<|separator|>", "") if skip else text
    assert "".join(pieces) == expected


def test_stream_decoder_releases_each_character_once_complete(tok):
    for char in "🦊🐉龍":
        ids = tok.encode(char)
        assert len(ids) > 1
        decoder = tok.stream_decoder()
        assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + [char]
        assert decoder.flush() == ""


def test_stream_decoder_flush_returns_an_incomplete_character(tok):
    ids = tok.encode("ab🐉")
    decoder = tok.stream_decoder()
    text = "".join(decoder.push(i) for i in ids[:-1])
    assert text == "ab"
    assert decoder.flush() == "\ufffd"


# ---------------------------------------------------------------- chat format

CONVERSATION = [
    {"role": "system", "content": "  You are a terse assistant.\n"},
    {"role": "user", "content": "\tWhat is a fox? 🦊  \n"},
    {"role": "assistant", "content": " A small wild canine.\n"},
    {"role": "user", "content": "Und auf Deutsch?"},
]
EXPECTED_CHAT = (
    "System: You are a terse assistant.<|separator|>\n\n"
    "Human: What is a fox? 🦊<|separator|>\n\n"
    "Assistant:  A small wild canine.\n<|separator|>\n\n"
    "Human: Und auf Deutsch?<|separator|>\n\n"
)


def test_grok2_chat_format(tok):
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=False) == EXPECTED_CHAT
    assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=True) == EXPECTED_CHAT + "Assistant:"
    assert tok.apply_chat_template(CONVERSATION) == EXPECTED_CHAT + "Assistant:"


def test_grok2_chat_format_strips_user_and_system_but_not_assistant(tok):
    messages = [
        {"role": "system", "content": " \n sys \t"},
        {"role": "user", "content": "\n\n  hello  world \n"},
        {"role": "assistant", "content": "  reply  \n"},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert prompt == (
        "System: sys<|separator|>\n\nHuman: hello  world<|separator|>\n\nAssistant:   reply  \n<|separator|>\n\n"
    )


def test_grok2_chat_prompt_encodes_separators_as_ids(tok, reference):
    prompt = tok.apply_chat_template(CONVERSATION)
    ids = tok.encode(prompt)
    assert ids == reference.encode(prompt, allowed_special="all")
    (sep,) = tok.chat_stop_ids
    assert ids.count(sep) == 4
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.eos_id not in ids


@pytest.mark.parametrize("role", ["tool", "developer", "Human"])
def test_grok2_chat_format_refuses_other_roles(tok, role):
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}]
    with pytest.raises(edgerun.TokenizerError, match=role):
        tok.apply_chat_template(messages)


def test_config_chat_template_overrides_the_grok2_format(tmp_path, table):
    ranks, specials = table
    write_table(tmp_path, ranks, specials)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}), encoding="utf-8")
    tok = Tokenizer.from_dir(tmp_path)
    messages = [{"role": "user", "content": " hi "}, {"role": "tool", "content": "42"}]
    assert tok.apply_chat_template(messages) == "[user] hi <|eos|>[tool]42<|eos|>"
    assert tok.chat_stop_ids == {specials["<|separator|>"]}


def test_no_chat_format_without_a_separator(tmp_path, table):
    ranks, specials = table
    specials = {name: i for name, i in specials.items() if name != "<|separator|>"}
    tok = Tokenizer.from_dir(write_table(tmp_path, ranks, specials))
    assert not tok.has_chat_template and tok.chat_stop_ids == set()
    with pytest.raises(edgerun.TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- errors


def broken(tmp_path: Path, content: str) -> Path:
    (tmp_path / "tokenizer.tok.json").write_text(content, encoding="utf-8")
    return tmp_path / "tokenizer.tok.json"


def valid(table) -> dict:
    ranks, specials = table
    return {
        "regular_tokens": [{"bytes": list(b), "token": i} for b, i in ranks.items()],
        "special_tokens": [{"bytes": list(s.encode("utf-8")), "token": i} for s, i in specials.items()],
        "word_split": "V1",
    }


@pytest.mark.parametrize("key", ["regular_tokens", "special_tokens"])
def test_missing_table_is_a_clear_error(tmp_path, table, key):
    data = valid(table)
    del data[key]
    path = broken(tmp_path, json.dumps(data))
    with pytest.raises(edgerun.TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_unknown_word_split_is_a_clear_error(tmp_path, table):
    path = broken(tmp_path, json.dumps({**valid(table), "word_split": "V9"}))
    with pytest.raises(edgerun.TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(err.value) and "V9" in str(err.value)


@pytest.mark.parametrize("content", ['{"regular_tokens": [', "", "[1, 2, 3]", '{"regular_tokens": 5}'])
def test_unreadable_tok_json_is_a_clear_error(tmp_path, content):
    path = broken(tmp_path, content)
    with pytest.raises(edgerun.TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    assert str(path) in str(err.value)


def test_empty_dir_names_tok_json(tmp_path):
    with pytest.raises(edgerun.TokenizerError, match=r"tokenizer\.tok\.json"):
        Tokenizer.from_dir(tmp_path)
