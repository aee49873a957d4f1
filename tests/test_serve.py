"""`edgerun serve`: the OpenAI-compatible server, driven over a loopback port by the official `openai` client and by
raw HTTP, on the demo model."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

import edgerun
from edgerun.demo_model import demo_model_dir
from edgerun.serve import create_app

openai = pytest.importorskip("openai")
NAME = "demo"
MESSAGES = [{"role": "user", "content": "Speak of the king."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app on a free loopback port, in a thread of this process."""

    def __init__(self, model, api_key: str | None = None):
        import uvicorn

        self.app = create_app(model, NAME, api_key=api_key)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model():
    return edgerun.load(demo_model_dir(), context_length=256)


@pytest.fixture(scope="module")
def server(model):
    s = Server(model)
    yield s
    s.stop()


def prompt_tokens(model, messages) -> int:
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return len(model.tokenizer.encode(text, add_special_tokens=False))


# -- the openai client --------------------------------------------------------------------------------------------
def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_with_a_seed_is_repeatable_and_counts_its_tokens(server, model):
    client = server.client()
    ask = dict(model=NAME, messages=MESSAGES, max_tokens=12, temperature=0.9, seed=7)
    first, second = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert first.choices[0].message.content == second.choices[0].message.content != ""
    assert first.choices[0].message.role == "assistant" and first.object == "chat.completion"
    usage = first.usage
    assert usage.prompt_tokens == prompt_tokens(model, MESSAGES)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if first.choices[0].finish_reason == "length":
        assert usage.completion_tokens == 12
    # the second request repeats the first one's prompt: all but its last token come from the KV cache
    assert second.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    other = client.chat.completions.create(**{**ask, "seed": 8})
    assert other.choices[0].message.content != first.choices[0].message.content


def test_streamed_chat_is_the_same_reply_in_pieces(server):
    client = server.client()
    ask = dict(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completions_stop_at_a_stop_string(server, model):
    client = server.client()
    free = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=24, temperature=0)
    text = free.choices[0].text
    assert free.usage.prompt_tokens == len(model.tokenizer.encode("ROMEO:", add_special_tokens=True))
    word = next(w for w in text.split() if len(w) > 2)
    cut = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=24, temperature=0, stop=[word])
    assert cut.choices[0].text == text[:text.index(word)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=24, temperature=0, stop=word,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_client_errors(server, model):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens") as e:
        client.completions.create(model=NAME, prompt="word " * 400)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="requested"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=MESSAGES, n=2)


# -- raw HTTP -------------------------------------------------------------------------------------------------------
def test_malformed_bodies_get_openai_errors(server):
    url = server.url + "/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    for body, param in (({"messages": []}, "messages"), ({"messages": MESSAGES, "temperature": 5}, "temperature"),
                        ({"messages": [{"content": "hi"}]}, "messages.0.role"), ([1, 2], None)):
        r = httpx.post(url, json=body)
        assert r.status_code == 400, body
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_an_api_key_is_required_when_set(model):
    s = Server(model, api_key="sesame")
    try:
        r = httpx.get(s.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert [m.id for m in s.client("sesame").models.list().data] == [NAME]
        assert httpx.get(s.url + "/health").status_code == 200  # health and metrics stay open
    finally:
        s.stop()


def test_a_client_that_disconnects_stops_its_generation(server, monkeypatch):
    worker = server.app.state.worker
    stream_ids = worker.model.stream_ids

    def paced(*args, **kwargs):  # 5 ms a token: the demo model alone could make all 200 before the disconnect shows
        for piece in stream_ids(*args, **kwargs):
            time.sleep(0.005)
            yield piece
    monkeypatch.setattr(worker.model, "stream_ids", paced)
    before = dict(worker.totals)
    threads = threading.active_count()
    body = {"model": NAME, "prompt": "KING:", "max_tokens": 200, "temperature": 0.9, "seed": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    t0 = time.perf_counter()
    reply = server.client().completions.create(model=NAME, prompt="QUEEN:", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens >= 1
    assert time.perf_counter() - t0 < 5  # not behind the 200 tokens nobody reads
    for _ in range(100):
        if worker.totals["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert worker.totals["cancelled"] == before["cancelled"] + 1
    assert worker.totals["completion_tokens"] - before["completion_tokens"] < 100
    assert worker.waiting == worker.running == 0 and threading.active_count() <= threads


def test_requests_queue_in_arrival_order(server):
    body = {"model": NAME, "prompt": "A", "max_tokens": 8, "temperature": 0}
    replies = [None] * 4

    def send(i: int) -> None:
        replies[i] = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    order = [(int(r.headers["x-edgerun-arrival"]), int(r.headers["x-edgerun-started"])) for r in replies]
    arrivals, starts = zip(*sorted(order))
    assert list(starts) == sorted(starts)  # started in the order they arrived
    metrics = httpx.get(server.url + "/metrics").text
    assert "edgerun_queue_waiting 0.0" in metrics and "edgerun_completion_tokens_total" in metrics
    assert json.loads(replies[0].text)["usage"]["completion_tokens"] >= 1


class _NoTemplate:
    """The model as a base model without a chat template shows itself."""

    def __init__(self, model):
        self._model = model
        self.tokenizer = type("T", (), {"has_chat_template": False, "encode": model.tokenizer.encode})()

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_a_model_without_a_chat_template_answers_completions_only(model):
    s = Server(_NoTemplate(model))
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template; use /v1/completions"):
            s.client().chat.completions.create(model=NAME, messages=MESSAGES)
        assert s.client().completions.create(model=NAME, prompt="KING:", max_tokens=3).choices[0].text
    finally:
        s.stop()


def test_the_command_checks_its_port_and_warns_when_open_to_the_network(monkeypatch, capsys):
    from edgerun.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2
    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: ran.update(host=host, port=port))
    assert main(["serve", "--host", "0.0.0.0", "--port", str(free_port()), "--ctx", "64"]) == 0
    err = capsys.readouterr().err
    assert ran["host"] == "0.0.0.0" and "without --api-key" in err and "demo-model at http://0.0.0.0" in err
    assert "note:" not in err
    # the options of approximate decoding reach edgerun.load (which says they change nothing with every expert in RAM)
    assert main(["serve", "--port", str(free_port()), "--ctx", "64", "--substitute-below", "0.3"]) == 0
    assert "edgerun: note: every expert is in RAM, so --substitute-below changes nothing" in capsys.readouterr().err


# -- the chat page's remote model ---------------------------------------------------------------------------------
def test_a_remote_model_answers_as_the_local_one(server, model):
    from edgerun.remote import RemoteModel

    remote = RemoteModel(server.url + "/v1")
    assert remote.context_length == model.context_length and remote.spec.num_experts == model.spec.num_experts
    assert remote.tokenizer.has_chat_template
    rendered = remote.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert len(remote.tokenizer.encode(rendered, add_special_tokens=False)) == prompt_tokens(model, MESSAGES)
    sampling = dict(temperature=0.7, seed=11)
    want = model.chat(MESSAGES, 10, **sampling)
    assert "".join(remote.stream_chat(MESSAGES, 10, **sampling)) == want
    assert "".join(remote.stream("KING:", 6, temperature=0)) == model.generate("KING:", 6, temperature=0)
    stats = remote.stats()
    assert stats["generated_tokens"] >= 1 and stats["context_length"] == model.context_length
    activity = remote.expert_activity(8)
    assert activity["layers"] == model.spec.moe_layers and activity["tokens"] >= 1
    # as a local model does, a reply asked for more than the context leaves stops when the context is full
    assert "".join(remote.stream("KING:", 10_000, temperature=0)) == model.generate("KING:", 10_000, temperature=0)
    with pytest.raises(edgerun.GenerationError, match="maximum context length"):
        list(remote.stream("word " * 400, 10))
    remote.close()


def test_an_unreachable_server_is_one_line():
    from edgerun.remote import RemoteError, RemoteModel

    with pytest.raises(RemoteError, match="cannot reach the server at http://127.0.0.1:"):
        RemoteModel(f"http://127.0.0.1:{free_port()}")


def test_the_chat_page_chats_through_a_server(server, model):
    """`edgerun chat --server URL`: the page's replies, figures and heatmap come from the server's model."""
    from edgerun.apps import chat
    from edgerun.remote import RemoteModel

    remote = RemoteModel(server.url)
    app = chat.ChatApp(remote, (server.url, "none", ""), {})
    assert chat.mode(remote) == "chat" and "chat mode" in chat.describe_model(remote)
    history = list(app.respond("Speak of the king.", [], "", 0.8, 0.95, 12, 5))[-1]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[-1]["content"] == model.chat(MESSAGES, 12, temperature=0.8, top_p=0.95, seed=5)
    header, stats, heat = app.live()
    assert "decode" in stats and "er-h" in heat
    status, _ = app.load_model("", "none", "")
    assert "chats with the server" in status
    remote.close()


def test_chat_with_an_unreachable_server_stops_in_one_line(capsys):
    from edgerun.cli import main

    assert main(["chat", "--server", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the server" in err[0]
    assert main(["chat", "some-model", "--server", "http://127.0.0.1:1"]) == 2
    assert "leave out MODEL" in capsys.readouterr().err
