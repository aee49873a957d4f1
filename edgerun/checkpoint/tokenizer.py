"""Text <-> token ids for a checkpoint directory, chat templates, and streaming detokenization.

Three kinds of tokenizer files exist in the wild: `tokenizer.json` (the HF `tokenizers` format, which
carries its own normalizer, added tokens and post-processor), `tokenizer.model` (a SentencePiece
model, around which this module does what HF's slow tokenizers do: split out special tokens written
in the text, add BOS/EOS, and render special tokens on decode) and `tokenizer.tok.json` (xAI's
tiktoken-style table of Grok-2, read with the `tiktoken` library). `tokenizer_config.json` supplies the
special tokens and the chat template.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

_CONFIG = "tokenizer_config.json"
TOK_JSON = "tokenizer.tok.json"
_TEMPLATE_FILE = "chat_template.jinja"
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _one_line(exc: BaseException) -> str:
    """An exception's message folded onto one line (library messages often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class _HFBackend:
    """A `tokenizers` tokenizer; the library handles added tokens and special-token insertion itself.

    `named` holds the special tokens tokenizer_config.json names (absent keys mean None).
    """

    def __init__(self, path: Path, named: dict[str, str | None]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for every parse failure
            raise TokenizerError(f"cannot load {path}: {_one_line(e)}") from None
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.named: dict[str, str | None] = {key: named.get(key) for key in _NAMED_TOKENS}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Ids outside the vocabulary (padded embedding rows) decode to nothing, as with SentencePiece;
        # the library would skip large ones but cannot take negative ones.
        known = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _SentencePieceBackend:
    """A SentencePiece model plus the added tokens a tokenizer_config.json declares."""

    def __init__(
        self,
        path: Path,
        added: dict[int, tuple[str, bool]],
        named: dict[str, str | None],
        add_bos: bool,
        add_eos: bool,
    ) -> None:
        """`added` maps ids to (content, special) from the config; `named` holds the special tokens the
        config names, and a key it lacks falls back to the model's own bos/eos/unk/pad piece."""
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # OSError or RuntimeError depending on how the proto is broken
            raise TokenizerError(f"cannot load {path}: {_one_line(e)}") from None
        sp = self._sp
        n = sp.get_piece_size()
        self.vocab_size: int = max([n, *(i + 1 for i in added)])
        self.add_bos = add_bos
        self.add_eos = add_eos

        # Per id: the bytes it decodes to, and whether skip_special_tokens drops it.
        self._bytes: list[bytes] = []
        self._special: list[bool] = []
        self._word_start: list[bool] = []
        self._ids: dict[str, int] = {}
        for i in range(n):
            piece = sp.id_to_piece(i)
            byte = _BYTE_PIECE.fullmatch(piece) if sp.is_byte(i) else None
            special = sp.is_control(i) or sp.is_unknown(i)
            if byte:
                data = bytes([int(byte.group(1), 16)])
            elif special:
                data = piece.encode()
            else:
                data = piece.replace("\u2581", " ").encode()
            self._bytes.append(data)
            self._special.append(special)
            self._word_start.append(not special and piece.startswith("\u2581"))
            if special and piece:
                self._ids[piece] = i
        for i in range(n, self.vocab_size):
            self._bytes.append(b"")
            self._special.append(False)
            self._word_start.append(False)
        for i, (content, special) in added.items():
            self._bytes[i] = content.encode()
            self._special[i] = special
            self._word_start[i] = False
            self._ids[content] = i

        model_ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(),
                     "pad_token": sp.pad_id()}
        self.named: dict[str, str | None] = {}
        self.named_ids: dict[str, int | None] = {}
        for key in _NAMED_TOKENS:
            if key in named:
                token = named[key]
                token_id = self.token_to_id(token) if token is not None else None
            else:
                token_id = model_ids[key] if model_ids[key] >= 0 else None
                token = sp.id_to_piece(token_id) if token_id is not None else None
            self.named[key] = token
            self.named_ids[key] = token_id
            if token is not None and token_id is not None:
                self._special[token_id] = True
                self._ids[token] = token_id

        # Longest first, so that "<|im_end|>" wins over a shorter token that is its prefix.
        literals = sorted((t for t in self._ids if t), key=len, reverse=True)
        self._split = re.compile("|".join(map(re.escape, literals))) if literals else None
        # Ask the library itself whether a word boundary at the very start of the text decodes to nothing.
        space_id = sp.piece_to_id("\u2581")
        self._strip_first_space = space_id == sp.unk_id() or sp.decode([space_id]) == ""

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos and self.named_ids["bos_token"] is not None:
            ids.append(self.named_ids["bos_token"])
        start = 0
        if self._split is not None:
            for m in self._split.finditer(text):
                if m.start() > start:
                    ids.extend(self._sp.encode(text[start : m.start()]))
                ids.append(self._ids[m.group()])
                start = m.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        if add_special_tokens and self.add_eos and self.named_ids["eos_token"] is not None:
            ids.append(self.named_ids["eos_token"])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        started = False
        for i in ids:
            if not 0 <= i < self.vocab_size or (skip_special_tokens and self._special[i]):
                continue
            data = self._bytes[i]
            # SentencePiece drops the word-boundary space it inserted in front of the text.
            if not started and self._word_start[i] and self._strip_first_space:
                data = data[1:]
            started = True
            out += data
        return out.decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._ids:
            return self._ids[token]
        token_id = self._sp.piece_to_id(token)
        # piece_to_id answers unk_id for anything it does not know.
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            return None
        return token_id


# The pre-tokenizer patterns a tokenizer.tok.json names in "word_split".
WORD_SPLITS = {
    "V1": (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+"""),
}
# Grok-2's chat format as its release defines it: "System: ", "Human: " and "Assistant: " turns, each ended by
# <|separator|> and a blank line (system and user text stripped of surrounding whitespace); the reply follows a
# final "Assistant:".
GROK2_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ 'System: ' ~ (m['content'] | trim) }}"
    "{% elif m['role'] == 'user' %}{{ 'Human: ' ~ (m['content'] | trim) }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' ~ m['content'] }}"
    "{% else %}{{ raise_exception('the Grok-2 chat format has no role ' ~ m['role']) }}{% endif %}"
    "{{ '<|separator|>\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class _TiktokenBackend:
    """xAI's `tokenizer.tok.json`: byte-level BPE tokens as byte lists with their ranks, special tokens, and a
    named pre-tokenizer pattern, encoded and decoded by `tiktoken`. No BOS is added (as in the reference
    engine); `<|eos|>` ends a sequence and `<|separator|>` ends each chat turn."""

    def __init__(self, path: Path, named: dict[str, str | None]) -> None:
        import tiktoken

        expected = f"a tiktoken-style table (regular_tokens, special_tokens, word_split {'/'.join(WORD_SPLITS)})"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            regular = {bytes(t["bytes"]): int(t["token"]) for t in data["regular_tokens"]}
            special = {bytes(t["bytes"]).decode("utf-8"): int(t["token"]) for t in data["special_tokens"]}
        except KeyError as e:
            raise TokenizerError(f"{path} has no {e.args[0]!r}; expected {expected}") from None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise TokenizerError(f"cannot read {path}: {_one_line(e)}") from None
        pattern = data.get("pat_str")
        if not isinstance(pattern, str):
            split = data.get("word_split")
            if split not in WORD_SPLITS:
                what = "no word_split" if split is None else f"an unknown word_split {split!r}"
                raise TokenizerError(f"{path} has {what}; expected {expected}")
            pattern = WORD_SPLITS[split]
        try:
            self._enc = tiktoken.Encoding(name=path.name, pat_str=pattern, mergeable_ranks=regular,
                                          special_tokens=special)
        except Exception as e:  # tiktoken's own checks (a bad pattern, clashing ids)
            raise TokenizerError(f"cannot load {path}: {_one_line(e)}") from None
        self._special = special
        self._special_ids = set(special.values())
        self._known = set(regular.values()) | self._special_ids
        self.vocab_size: int = max(int(data.get("vocab_size") or 0), self._enc.max_token_value + 1)
        defaults = {"bos_token": None, "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": None}
        self.named: dict[str, str | None] = {}
        for key in _NAMED_TOKENS:
            token = named.get(key, defaults[key])
            self.named[key] = token if token is None or self.token_to_id(token) is not None else None
        self.chat_template = GROK2_CHAT_TEMPLATE if "<|separator|>" in special else None
        self.chat_stop_tokens = ["<|separator|>"] if "<|separator|>" in special else []

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        bos = self.named["bos_token"]
        ids = self._enc.encode(text, allowed_special="all")
        return [self._special[bos], *ids] if add_special_tokens and bos in self._special else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        keep = [i for i in ids if i in self._known and not (skip_special_tokens and i in self._special_ids)]
        return self._enc.decode_bytes(keep).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return config


def _token_text(value: Any, key: str, source: Path) -> str | None:
    """A special token given either as a string or as a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: {key} must be a string or an object with a string 'content'")


def _added_tokens(config: dict[str, Any], source: Path) -> dict[int, tuple[str, bool]]:
    raw = config.get("added_tokens_decoder") or {}
    if not isinstance(raw, dict):
        raise TokenizerError(f"{source}: added_tokens_decoder must be an object mapping ids to tokens")
    added: dict[int, tuple[str, bool]] = {}
    for key, entry in raw.items():
        token_id = int(key) if key.isdigit() else -1
        if token_id < 0 or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise TokenizerError(
                f"{source}: added_tokens_decoder entry {key!r} must map a token id to an object with 'content'"
            )
        added[token_id] = (entry["content"], bool(entry.get("special", False)))
    return added


def _config_template(config: dict[str, Any], source: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default":
                if not isinstance(entry.get("template"), str):
                    raise TokenizerError(f"{source}: the 'default' chat_template entry has no template string")
                return entry["template"]
        return None
    raise TokenizerError(f"{source}: chat_template must be a string or a list of {{name, template}} objects")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would corrupt prompts.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template rejected the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """A checkpoint's tokenizer: encoding, decoding, chat templates and streaming decode.

    Build one with `Tokenizer.from_dir`.
    """

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend | _TiktokenBackend,
        chat_template: str | None,
        template_source: Path | str | None,
        chat_stop_tokens: Sequence[str] = (),
    ) -> None:
        self._backend = backend
        self._chat_template = chat_template
        self._template_source = template_source
        self._compiled: jinja2.Template | None = None
        self.vocab_size: int = backend.vocab_size
        self.bos_token: str | None = backend.named["bos_token"]
        self.eos_token: str | None = backend.named["eos_token"]
        self.bos_id: int | None = self.token_to_id(self.bos_token) if self.bos_token is not None else None
        self.eos_id: int | None = self.token_to_id(self.eos_token) if self.eos_token is not None else None
        # tokens that end a reply in the chat format besides EOS (Grok-2's turn separator)
        self.chat_stop_ids: set[int] = {i for i in map(self.token_to_id, chat_stop_tokens) if i is not None}

    @classmethod
    def from_dir(cls, path: str | os.PathLike, defaults: dict | None = None) -> Tokenizer:
        """Load the tokenizer of a model directory.

        Uses tokenizer.json when present, else tokenizer.model, else tokenizer.tok.json, and reads
        tokenizer_config.json (special tokens, BOS/EOS insertion, added tokens, chat template) and
        chat_template.jinja (which overrides the config's template) when they exist. A tokenizer.tok.json
        without either brings Grok-2's chat format. defaults: tokenizer_config.json values where the file has none.
        """
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"tokenizer directory {root} does not exist or is not a directory")
        json_file, model_file, tok_file = root / "tokenizer.json", root / "tokenizer.model", root / TOK_JSON
        config_file = root / _CONFIG
        config = {**(defaults or {}), **(_read_config(config_file) if config_file.is_file() else {})}
        named = {key: _token_text(config[key], key, config_file) for key in _NAMED_TOKENS if key in config}

        backend: _HFBackend | _SentencePieceBackend | _TiktokenBackend
        stop_tokens: list[str] = []
        if json_file.is_file():
            backend = _HFBackend(json_file, named)
        elif model_file.is_file():
            add_bos = config.get("add_bos_token", True)
            add_eos = config.get("add_eos_token", False)
            if not isinstance(add_bos, bool) or not isinstance(add_eos, bool):
                raise TokenizerError(f"{config_file}: add_bos_token and add_eos_token must be true or false")
            backend = _SentencePieceBackend(
                model_file, _added_tokens(config, config_file), named, add_bos, add_eos
            )
        elif tok_file.is_file():
            backend = _TiktokenBackend(tok_file, named)
            stop_tokens = backend.chat_stop_tokens
        else:
            raise TokenizerError(f"no tokenizer in {root}: expected tokenizer.json, tokenizer.model or {TOK_JSON}")

        template_file = root / _TEMPLATE_FILE
        if template_file.is_file():
            try:
                template: str | None = template_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read {template_file}: {_one_line(e)}") from None
            source: Path | None = template_file
        else:
            template = _config_template(config, config_file)
            source = config_file if template is not None else None
        if template is None and isinstance(backend, _TiktokenBackend) and backend.chat_template is not None:
            template, source = backend.chat_template, f"{tok_file} (Grok-2's chat format)"
        return cls(backend, template, source, stop_tokens)

    @property
    def has_chat_template(self) -> bool:
        """Whether apply_chat_template can render prompts for this model."""
        return self._chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text map to their ids.

        `add_special_tokens` adds what the model expects around a sequence (usually BOS).
        """
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; ids outside the vocabulary are ignored."""
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a single token (vocabulary entry or added token), or None."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render a conversation into a prompt string with the model's chat template.

        `messages` are dicts with string "role" and "content"; `extra` becomes template variables
        (for example `tools`, or flags a template reads).
        """
        if self._chat_template is None:
            raise TokenizerError("this model has no chat template; pass a plain prompt instead")
        if not isinstance(messages, list):
            raise TokenizerError("messages must be a list of {'role', 'content'} dicts")
        for n, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise TokenizerError(f"message {n} must be a dict with string 'role' and 'content'")
        template = self._template()
        # Unset tokens stay undefined so that templates render them as empty, not as "None".
        variables = {key: value for key, value in self._backend.named.items() if value is not None}
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt, **extra)
        try:
            return template.render(**variables)
        except TokenizerError as e:  # raise_exception: the template refused these messages
            raise TokenizerError(f"{self._template_source}: {_one_line(e)}") from None
        except Exception as e:  # anything a template does wrong with its inputs
            raise TokenizerError(
                f"chat template in {self._template_source} failed: {type(e).__name__}: {_one_line(e)}"
            ) from None

    def _template(self) -> jinja2.Template:
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = _strftime_now
            try:
                self._compiled = env.from_string(self._chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(
                    f"chat template in {self._template_source} has a syntax error on line {e.lineno}: "
                    f"{_one_line(e)}"
                ) from None
        return self._compiled

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """A decoder that turns ids arriving one by one into text as soon as it is final."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization.

    Text is released only once it can no longer change: never half a UTF-8 character, and with the
    word-boundary spaces a full decode would produce. Each push decodes just a short window of ids:
    those since the last release (`read`) plus the ones before it that produced the last released text
    (the window's head), which gives later tokens the left context their leading space depends on.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._window: list[int] = []
        self._read = 0
        self._released = ""  # decode of the window's head, window[:read]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that has become final (possibly "")."""
        self._window.append(token_id)
        text = self._decode(self._window)
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait for the rest.
        if len(text) <= len(self._released) or text.endswith("\ufffd"):
            return ""
        return self._release(text)

    def flush(self) -> str:
        """Return whatever text is still held back (e.g. an incomplete character at the end)."""
        text = self._decode(self._window)
        if len(text) <= len(self._released):
            return ""
        return self._release(text)

    def _release(self, text: str) -> str:
        new = text[len(self._released) :]
        # The ids just released become the head of the next window.
        del self._window[: self._read]
        self._read = len(self._window)
        self._released = self._decode(self._window)
        return new
