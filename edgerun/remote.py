"""A model served by `edgerun serve` elsewhere, with the part of `Model`'s interface the chat page uses: text
streamed from the server's OpenAI-compatible API, token counts from its /tokenize, figures and expert activity
from its /edgerun endpoints.

    model = RemoteModel("http://127.0.0.1:8000", api_key=None)
    for piece in model.stream_chat([{"role": "user", "content": "Hi"}], 64):
        print(piece, end="")
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx

from .errors import EdgerunError, GenerationError


class RemoteError(EdgerunError):
    """The server could not be reached, or answered with an error."""


class RemoteModel:
    remote = True  # the chat page loads no model of its own beside it

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        base = url.rstrip("/")
        self.url = base[:-3] if base.endswith("/v1") else base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        info = self._get("/edgerun/model")
        self.name = info["name"]
        self.spec = SimpleNamespace(**info["spec"])
        self.path = f"{self.url} ({self.name})"
        self.tokenizer = _RemoteTokenizer(self, info["has_chat_template"])
        self.context_length = int(info["stats"]["context_length"])
        self._stats = info["stats"]

    # -- requests --------------------------------------------------------------------------------------------
    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:200] or r.reason_phrase
            error = GenerationError if r.status_code == 400 else RemoteError
            raise error(f"{self.url}: {message}")
        return r

    def _request(self, method: str, path: str, **kwargs) -> dict:
        try:
            return self._check(self._http.request(method, path, **kwargs)).json()
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach the server at {self.url}: {e}") from None

    def _get(self, path: str, **params) -> dict:
        return self._request("GET", path, params=params)

    def _post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, json=body)

    def _events(self, path: str, body: dict) -> Iterator[dict]:
        try:
            with self._http.stream("POST", path, json={**body, "model": self.name, "stream": True}) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise GenerationError(f"{self.url}: {event['error']['message']}")
                    yield event
        except httpx.HTTPError as e:
            raise RemoteError(f"the server at {self.url} stopped answering: {e}") from None

    # -- what the page calls ---------------------------------------------------------------------------------
    def _room(self, asked: int, prompt: dict) -> int:
        """At most what the context leaves after the prompt, as a local model stops when its context is full (the
        server refuses a request whose prompt and max_tokens together pass the context)."""
        count = self._post("/tokenize", prompt)["count"]
        return max(1, min(int(asked), self.context_length - count))

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 512, **sampling) -> Iterator[str]:
        body = {"messages": messages, "max_tokens": self._room(max_new_tokens, {"messages": messages}),
                **_sampling(sampling)}
        for event in self._events("/v1/chat/completions", body):
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    yield choice["delta"]["content"]

    def stream(self, prompt: str, max_new_tokens: int = 256, **sampling) -> Iterator[str]:
        body = {"prompt": prompt, "max_tokens": self._room(max_new_tokens, {"prompt": prompt}), **_sampling(sampling)}
        for event in self._events("/v1/completions", body):
            for choice in event["choices"]:
                if choice.get("text"):
                    yield choice["text"]

    def stats(self) -> dict:
        try:
            self._stats = self._get("/edgerun/model")["stats"]
        except EdgerunError:
            pass  # the page keeps showing the last figures while the server is away
        return dict(self._stats)

    def expert_activity(self, tokens: int = 32) -> dict:
        return self._get("/edgerun/activity", tokens=int(tokens))

    def close(self) -> None:
        self._http.close()


class _RemoteTokenizer:
    """What the page asks of a tokenizer, answered by the server: whether there is a chat template, and token
    counts (rendered prompts are counted as the ids of the text they stand for)."""

    def __init__(self, model: RemoteModel, has_chat_template: bool):
        self._model, self.has_chat_template = model, has_chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> _Rendered:
        return _Rendered(messages)

    def encode(self, text, add_special_tokens: bool = True) -> list[int]:
        if isinstance(text, _Rendered):
            return self._model._post("/tokenize", {"messages": text.messages})["tokens"]
        return self._model._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})["tokens"]


class _Rendered(str):
    """A conversation whose template the server applies."""

    def __new__(cls, messages: list[dict]):
        out = super().__new__(cls, "")
        out.messages = messages
        return out


def _sampling(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}
