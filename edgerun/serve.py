"""An OpenAI-compatible HTTP server over one loaded model: `/v1/chat/completions` and `/v1/completions` (streamed
as server-sent events or not), `/v1/models`, `/health` and `/metrics` (Prometheus text).

One model computes one generation at a time (at batch 1 a CPU or a single GPU gains little from interleaving):
requests wait in a first-come, first-served queue and a worker thread runs them in arrival order. A client that
disconnects cancels its generation at the next token; the KV cache keeps the previous request's tokens, so a chat's
next turn prefills only what is new. Errors have OpenAI's JSON shape and status codes.

    app = create_app(model, "my-model", api_key=None)   # an ASGI app (FastAPI)
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .errors import EdgerunError

ENDED = object()  # what the worker sends when a job's text is complete


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.code, self.param)


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


# -- request bodies (unknown fields are accepted and ignored, as OpenAI's API does) --------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off, as vLLM takes it
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self) -> dict:
        top_k = None if self.top_k is None else max(self.top_k, 0)
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=top_k, min_p=self.min_p,
                    repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop or None)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a text prompt, or chat messages put in the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


# -- the queue and its worker ---------------------------------------------------------------------------------------
@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    options: dict
    chat: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    arrival: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: int | None = None  # its place in the order jobs were started
    usage: dict = field(default_factory=dict)
    finish_reason: str = "stop"

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Worker:
    """Runs jobs one at a time, in the order they arrived, on its own thread."""

    def __init__(self, model):
        self.model = model
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._arrivals = itertools.count()
        self._starts = itertools.count()
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.totals = {"requests": 0, "cancelled": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0,
                       "completion_tokens": 0}
        self.last: dict = {}  # the figures of the last finished generation
        self._thread = threading.Thread(target=self._run, name="edgerun-serve", daemon=True)
        self._thread.start()

    def submit(self, ids: list[int], max_tokens: int, options: dict, chat: bool) -> Job:
        loop = asyncio.get_running_loop()
        with self._lock:
            job = Job(ids, max_tokens, options, chat, loop, asyncio.Queue(), next(self._arrivals))
            self.waiting += 1
            self._jobs.put(job)
        return job

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
                self.running = 1
                job.started = next(self._starts)
            try:
                last = self._generate(job)
            except EdgerunError as e:
                last = ApiError(400, str(e))
            except Exception as e:  # a failure of one request must not stop the server
                last = ApiError(500, f"{type(e).__name__}: {e}", "server_error")
            with self._lock:
                self.running = 0
            job.send(last)  # after the worker is free: a client that sees its reply end finds it idle

    def _generate(self, job: Job) -> object:
        """Run one job, sending its text; returns what ends it (ENDED)."""
        if job.cancelled.is_set():
            self.totals["cancelled"] += 1
            return ENDED
        pieces = self.model.stream_ids(job.ids, job.max_tokens, chat=job.chat, **job.options)
        try:
            for piece in pieces:
                if job.cancelled.is_set():
                    break
                job.send(piece)
        finally:
            pieces.close()
        s = self.model.stats()
        job.finish_reason = "stop" if s["finish_reason"] == "stop" else "length"
        job.usage = {"prompt_tokens": s["prompt_tokens"], "completion_tokens": s["generated_tokens"],
                     "total_tokens": s["prompt_tokens"] + s["generated_tokens"],
                     "prompt_tokens_details": {"cached_tokens": s["cached_prompt_tokens"]}}
        self.totals["requests"] += 1
        self.totals["cancelled"] += job.cancelled.is_set()
        for key, stat in (("prompt_tokens", "prompt_tokens"), ("cached_prompt_tokens", "cached_prompt_tokens"),
                          ("completion_tokens", "generated_tokens")):
            self.totals[key] += s[stat]
        self.last = s
        return ENDED


def _plain(value) -> bool:
    """Whether a stats value goes into JSON as it is."""
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# -- the app --------------------------------------------------------------------------------------------------------
def create_app(model, model_name: str, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving `model` under `model_name`; with api_key, every /v1 request must carry it as a bearer
    token."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    worker = Worker(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="edgerun", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.worker = worker
    created = int(time.time())
    try:
        has_template = model.tokenizer.has_chat_template
    except EdgerunError:
        has_template = False

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        if not where and first.get("type") in ("model_attributes_type", "dict_type"):
            return error_response(400, "the request body must be a JSON object", code="invalid_json")
        return error_response(400, f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error_response(401, "invalid or missing API key (send it as 'Authorization: Bearer KEY')",
                                      code="invalid_api_key")
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name and name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           code="model_not_found", param="model")

    def budget(prompt: int, asked: int | None) -> int:
        ctx = model.context_length
        if asked is None:
            if prompt >= ctx:
                raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt "
                                    f"has {prompt} tokens.", code="context_length_exceeded", param="messages")
            return ctx - prompt
        if prompt + asked > ctx:
            raise ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt + asked} tokens ({prompt} in the prompt, {asked} in the completion).",
                           code="context_length_exceeded", param="max_tokens")
        return asked

    def encode_chat(chat: list[Message]) -> list[int]:
        if not has_template:
            raise ApiError(400, f"the model '{model_name}' has no chat template; use /v1/completions with the text "
                                f"to continue", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in chat]
        try:
            text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except EdgerunError as e:
            raise ApiError(400, str(e), param="messages") from None
        return model.tokenizer.encode(text, add_special_tokens=False)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        """The prompt's token ids as the server would count them (vLLM's endpoint, which front-ends use to fit a
        conversation into the context)."""
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = encode_chat(body.messages)
        else:
            ids = model.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": model.context_length, "tokens": ids}

    @app.get("/edgerun/model")
    async def describe() -> dict:
        """The model's figures (`Model.stats()`) and shape, for edgerun's own chat page."""
        spec = model.spec
        stats = {k: v for k, v in model.stats().items() if _plain(v)}  # live: the figures of a reply being made
        return {"name": model_name, "stats": stats, "has_chat_template": has_template,
                "generating": bool(worker.running), "waiting": worker.waiting,
                "spec": {"moe_layers": spec.moe_layers, "num_experts": spec.num_experts, "top_k": spec.top_k}}

    @app.get("/edgerun/activity")
    async def activity(tokens: int = 32) -> dict:
        """Which experts the last tokens chose and where every expert is (`Model.expert_activity`)."""
        return model.expert_activity(tokens)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "edgerun"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model)
        ids = encode_chat(body.messages)
        max_tokens = budget(len(ids), body.max_completion_tokens or body.max_tokens)
        return await respond(request, body, ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        ids = model.tokenizer.encode(prompts[0], add_special_tokens=True)
        max_tokens = budget(len(ids), body.max_tokens or 16)  # OpenAI's default for completions
        return await respond(request, body, ids, max_tokens, chat=False)

    async def respond(request: Request, body: _Sampling, ids: list[int], max_tokens: int, chat: bool):
        job = worker.submit(ids, max_tokens, body.sampling(), chat)
        kind = "chat.completion" if chat else "text_completion"
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": model_name}
        headers = {"x-edgerun-arrival": str(job.arrival)}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(job, head, kind, chat, usage), media_type="text/event-stream",
                                     headers=headers)
        text = []
        try:
            async for piece in pieces(job, request):
                text.append(piece)
        finally:
            job.cancelled.set()  # a no-op once it ended; else the client went away
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                   "finish_reason": job.finish_reason} if chat else
                  {"index": 0, "text": content, "logprobs": None, "finish_reason": job.finish_reason})
        headers["x-edgerun-started"] = str(job.started)
        return JSONResponse({**head, "object": kind, "choices": [choice], "usage": job.usage}, headers=headers)

    async def pieces(job: Job, request: Request | None = None) -> AsyncIterator[str]:
        """The job's text as the worker makes it; raises the job's ApiError."""
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    job.cancelled.set()
                    return
                continue
            if item is ENDED:
                return
            if isinstance(item, ApiError):
                raise item
            yield item

    async def sse(job: Job, head: dict, kind: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict, usage: dict | None = None, choices: bool = True) -> str:
            data = {**head, "object": chunk_kind, "choices": [choice] if choices else []}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        try:
            if chat:
                yield event(choice(None, None, role=True))
            try:
                async for piece in pieces(job):
                    yield event(choice(piece, None))
            except ApiError as e:
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.code}})}\n\n"
                return
            yield event(choice(None if chat else "", job.finish_reason))
            if include_usage:
                yield event({}, job.usage, choices=False)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # the client went away (or it ended): nothing more is made for it

    registry = CollectorRegistry()

    def gauge(name: str, doc: str, read) -> None:
        Gauge(name, doc, registry=registry).set_function(lambda: float(read() or 0))

    gauge("edgerun_queue_waiting", "requests waiting for the model", lambda: worker.waiting)
    gauge("edgerun_queue_running", "requests being generated (0 or 1)", lambda: worker.running)
    for key, doc in (("requests", "generations finished"), ("cancelled", "generations cut short by a disconnect"),
                     ("prompt_tokens", "prompt tokens of finished generations"),
                     ("cached_prompt_tokens", "prompt tokens found in the KV cache"),
                     ("completion_tokens", "tokens generated")):
        gauge(f"edgerun_{key}_total", doc, lambda key=key: worker.totals[key])
    for key, doc in (("decode_tokens_per_s", "decode speed of the last generation"),
                     ("prefill_tokens_per_s", "prefill speed of the last generation"),
                     ("time_to_first_token_s", "time to the first token of the last generation"),
                     ("hit_rate", "share of expert uses found in RAM (offloading)"),
                     ("gpu_hit_rate", "share of expert uses found on the GPU"),
                     ("bytes_read", "expert bytes read from disk in the last generation"),
                     ("peak_rss_bytes", "peak resident memory of the process")):
        gauge(f"edgerun_{key}", doc, lambda key=key: worker.last.get(key))
    def tier_bytes(tier: str) -> int:
        planned = worker.last.get("tier_bytes")  # a store's plan; a model directory holds everything in RAM
        if planned is None:
            return worker.last.get("weights_bytes", 0) + worker.last.get("kv_cache_bytes", 0) if tier == "ram" else 0
        return planned.get(tier, 0)

    for tier in ("ram", "gpu", "disk"):
        gauge(f"edgerun_memory_{tier}_bytes", f"bytes of the model on this tier ({tier})",
              lambda tier=tier: tier_bytes(tier))

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        if not worker.last:
            worker.last = model.stats()
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    return app
