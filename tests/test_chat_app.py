"""`edgerun chat`: the web page (served in-process on a free port), its live panel, queueing and cancelling, the
command's arguments, and Model.expert_activity behind the heatmap."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

gr = pytest.importorskip("gradio", reason="the chat app needs gradio")
httpx = pytest.importorskip("httpx")

import edgerun  # noqa: E402
from edgerun.apps import chat  # noqa: E402
from edgerun.cli import main  # noqa: E402
from edgerun.runtime.offload import OffloadedExperts  # noqa: E402
from edgerun.store.convert import convert  # noqa: E402
from edgerun.store.store import ExpertStore  # noqa: E402
from edgerun.units import format_size  # noqa: E402
from edgerun.synthetic import mixtral_config, write_random_mixtral  # noqa: E402

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SETTINGS = ("", 0.8, 0.95)  # system prompt, temperature, top-p


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """A small random Mixtral (4 MoE layers x 8 experts) with the Mixtral tokenizer and a chat template, and its
    q4 store."""
    base = tmp_path_factory.mktemp("chat")
    hf = write_random_mixtral(base / "hf", mixtral_config(128, 4, 8, 256, heads=4, kv_heads=2, context=4096), seed=3)
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": TEMPLATE}))
    convert(hf, base / "q4", quant="q4", progress=False)
    return {"hf": hf, "q4": base / "q4"}


@pytest.fixture(scope="module")
def model(paths):
    return edgerun.load(paths["hf"])


@pytest.fixture(scope="module")
def base_path(paths, tmp_path_factory):
    """The same model as a base model: its weights and tokenizer, without a chat template."""
    path = tmp_path_factory.mktemp("base") / "hf"
    shutil.copytree(paths["hf"], path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return path


@contextmanager
def serving(app: chat.ChatApp):
    page, url = app.launch(port=chat.free_port())
    try:
        yield page, url
    finally:
        page.close()


@pytest.fixture(scope="module")
def served(model):
    app = chat.ChatApp(model)
    with serving(app) as (page, url):
        yield app, page, url


def offload(model: edgerun.Model, slots: int, **approximate) -> OffloadedExperts:
    """Put the model's experts behind a cache of `slots` expert slots over its store."""
    experts = OffloadedExperts(ExpertStore(model.path), model.spec.activation, slots, **approximate)
    model.use_experts(experts).close()
    return experts


def api_reply(model, text: str, max_tokens: int, seed: int) -> str:
    return model.chat([{"role": "user", "content": text}], max_tokens, temperature=SETTINGS[1], top_p=SETTINGS[2],
                      seed=seed)


def reply_text(history) -> str:
    assert history[-1]["role"] == "assistant"
    return chat.message_text(history[-1]["content"])


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def model_is_free(model) -> bool:
    """Whether no generation holds the model (its generations run one at a time under this lock)."""
    if model._lock.acquire(blocking=False):
        model._lock.release()
        return True
    return False


# -- the API behind the heatmap ----------------------------------------------------------------------------------
def test_expert_activity_counts_routing_and_reports_the_cache(paths):
    held = edgerun.load(paths["hf"])
    activity = held.expert_activity()
    assert activity["layers"] == [0, 1, 2, 3] and activity["num_experts"] == 8 and activity["tokens"] == 0
    assert activity["all_resident"] and all(all(row) for row in activity["resident"])
    held.generate_ids(held.tokenizer.encode("The quick brown fox"), 20, temperature=0.8, seed=1, ignore_eos=True)
    activity = held.expert_activity(tokens=16)
    assert activity["tokens"] == 16
    for counts in activity["used"]:  # each of the 16 tokens chose top_k = 2 distinct experts in every layer
        assert sum(counts) == 32 and max(counts) <= 16 and sum(c > 0 for c in counts) >= 2

    small = edgerun.load(paths["q4"])
    experts = offload(small, slots=6)
    small.generate_ids(small.tokenizer.encode("The quick brown fox"), 12, temperature=0.8, seed=2, ignore_eos=True)
    activity = small.expert_activity()
    assert not activity["all_resident"]
    in_ram = {(layer, e) for i, layer in enumerate(activity["layers"]) for e in range(8) if activity["resident"][i][e]}
    assert in_ram == {(experts.layers[p], e) for p, e in experts.cache.resident()}
    assert 0 < len(in_ram) <= 6 and not any(map(any, activity["loading"]))  # nothing is read once a reply is done
    assert all(sum(counts) > 0 for counts in activity["used"])
    html = chat.render_heatmap(activity)
    assert html.count('class="er-c ') == 32 and html.count("er-ram") - html.count('er-sw er-ram') == len(in_ram)
    experts.close()


# -- chatting through the page's API -----------------------------------------------------------------------------
def test_chat_streams_pieces_and_matches_the_api(served, model):
    from gradio_client import Client

    app, page, url = served
    client = Client(url, verbose=False)
    job = client.submit("Tell me about disks.", [], *SETTINGS, 300, 11, api_name="/chat")
    history = job.result(timeout=60)
    partial = [reply_text(h) for h in job.outputs() if h and h[-1]["role"] == "assistant"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    # pieces go out at most UPDATE_SECONDS apart: 300 tokens of this model take several such intervals
    assert len(set(partial)) >= 5, "the reply should arrive in several streamed pieces"
    assert all(b.startswith(a) for a, b in zip(partial, partial[1:]))  # each update extends the last
    assert reply_text(history) == api_reply(model, "Tell me about disks.", 300, 11) != ""

    # a follow-up turn sends the whole conversation through the chat template
    history2 = client.predict("And about RAM?", history, *SETTINGS, 8, 5, api_name="/chat")
    messages = [{"role": "user", "content": "Tell me about disks."},
                {"role": "assistant", "content": reply_text(history)}, {"role": "user", "content": "And about RAM?"}]
    assert len(history2) == 4
    assert reply_text(history2) == model.chat(messages, 8, temperature=0.8, top_p=0.95, seed=5)

    # Regenerate drops the last reply and answers the same message again; Clear empties the chat
    trimmed = chat.ChatApp.drop_reply(history2)
    assert len(trimmed) == 3 and trimmed[-1]["role"] == "user"
    regenerated = client.predict("", trimmed, *SETTINGS, 8, 6, api_name="/chat")
    assert len(regenerated) == 4 and reply_text(regenerated) == model.chat(messages, 8, temperature=0.8,
                                                                           top_p=0.95, seed=6)
    assert client.predict("", regenerated, *SETTINGS, 8, 6, api_name="/chat") == regenerated  # no new user message
    assert client.predict(api_name="/clear")[0] == []


def test_every_token_is_computed_on_the_model_thread(served, model):
    """The server calls a reply's generator from changing worker threads; the model itself only ever runs on
    one thread (its kernels' thread pools belong to the calling thread)."""
    from gradio_client import Client

    app, page, url = served
    threads = set()
    class Recording:  # an experts container that notes the calling thread and hands the work on
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, layer, x, idx, weights):
            threads.add(threading.current_thread().name)
            return self.inner(layer, x, idx, weights)

        def __getattr__(self, name):  # the rest of the contract: the wrapped container's
            return getattr(self.inner, name)

    inner = model.use_experts(Recording(model.experts))
    try:
        client = Client(url, verbose=False)
        for seed in (1, 2):
            client.predict("Which thread?", [], *SETTINGS, 40, seed, api_name="/chat")
    finally:
        model.use_experts(inner)
    assert threads == {"edgerun-model"}


def test_live_panel_shows_the_figures_of_the_reply(served, model):
    from gradio_client import Client

    app, page, url = served
    client = Client(url, verbose=False)
    client.predict("Count to ten.", [], *SETTINGS, 16, 3, api_name="/chat")
    header, stats_html, heat_html = client.predict(api_name="/live")
    assert "4 MoE layers x 8 experts, top-2" in header and "all experts in memory" in header
    s = model.stats()
    assert f"{s['decode_tokens_per_s']:.1f}" in stats_html and "tok/s" in stats_html
    assert f"{s['time_to_first_token_s'] * 1000:.0f}" in stats_html and "16 tokens" in stats_html
    assert "all experts are in memory" in stats_html and "KV cache" in stats_html
    cells = re.findall(r'title="layer (\d+), expert (\d+): chosen by (\d+) of the last (\d+) tokens', heat_html)
    assert len(cells) == 4 * 8
    activity = model.expert_activity(chat.ACTIVITY_TOKENS)
    for layer, e, n, tokens in cells:  # the heatmap shows the model's own counts
        assert int(n) == activity["used"][int(layer)][int(e)] and int(tokens) == activity["tokens"]
    assert all(sum(int(n) for layer, _, n, _ in cells if int(layer) == i) > 0 for i in range(4))


def test_live_panel_of_an_offloaded_model(paths):
    small = edgerun.load(paths["q4"], ram="64GiB")  # a store under a budget: the plan is shown by tier
    experts = offload(small, slots=6)
    small.generate_ids(small.tokenizer.encode("Hello"), 10, temperature=0.8, seed=4, ignore_eos=True)
    header, stats_html, heat_html = chat.ChatApp(small).live()
    assert "6 of 32 experts in RAM, the rest on disk" in header
    plan = small.stats()["memory_plan"]
    assert "budget" in stats_html and format_size(plan["budget_bytes"]) in stats_html
    for label in ("resident weights", "KV cache", "expert slots", "expert hits", "prefetch recall", "read from disk"):
        assert label in stats_html
    assert f"{len(experts.cache.resident())} of 32 experts in RAM" in heat_html
    assert "approximate" not in stats_html  # exact decoding
    experts.close()
    experts = offload(small, slots=6, substitute_below=0.999, skip_below=0.3)
    small.generate_ids(small.tokenizer.encode("Hello"), 10, temperature=0.8, seed=4, ignore_eos=True)
    stats = small.stats()
    _, stats_html, _ = chat.ChatApp(small).live()
    replaced, left_out = round(100 * stats["substituted_rate"]), round(100 * stats["skipped_rate"])
    assert replaced > 0 and f"{replaced}% replaced" in stats_html and "approximate" in stats_html
    assert left_out == 0 or f"{left_out}% left out" in stats_html
    experts.close()


def test_the_heatmap_shows_the_experts_in_gpu_slots(paths):
    model = edgerun.load(paths["q4"], gpu="256MB", device="cpu", misses="copy")  # the CPU stands in for a GPU
    model.generate_ids(model.tokenizer.encode("Hello"), 6, temperature=0.8, seed=4, ignore_eos=True)
    activity = model.expert_activity()
    on_gpu = {(layer, e) for i, layer in enumerate(activity["layers"]) for e in range(8) if activity["on_gpu"][i][e]}
    tier = model.experts
    assert on_gpu and on_gpu == {(tier.layers[p], e) for p, e in tier.cache.resident()}
    header, stats_html, heat_html = chat.ChatApp(model).live()
    assert "32 of 32 in GPU slots on cpu" in header
    assert "GPU (cpu)" in stats_html and "expert slots" in stats_html and "run there" in stats_html
    assert f"{len(on_gpu)} on the GPU" in heat_html and heat_html.count("er-c er-gpu") == len(on_gpu)


def test_a_long_conversation_keeps_to_the_context(paths, capsys):
    short = edgerun.load(paths["hf"], context_length=96)
    app = chat.ChatApp(short)
    assert app.token_limit()["maximum"] == 96  # the page's max-new-tokens slider ends at the context
    assert app.token_limit(256)["value"] == 96 and "value" not in app.token_limit(16)  # a larger value comes down
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question number {i} about the weather in the mountains"},
                    {"role": "assistant", "content": f"answer number {i}: it is cold and windy up there today"}]
    messages = chat.to_messages(history + [{"role": "user", "content": "And now?"}], "Be brief.")
    kept, dropped = chat.fit_context(short, messages, 16)
    assert dropped > 0 and kept[0] == messages[0] and kept[-1] == messages[-1] and kept[1]["role"] == "user"
    assert kept == [messages[0]] + messages[1 + dropped:]
    longer = [messages[0]] + messages[dropped - 1:]  # one turn (user and assistant) more
    assert chat.prompt_tokens(short, kept) + 16 <= 96 < chat.prompt_tokens(short, longer) + 16
    final = list(app.respond("And now?", history, "Be brief.", 0.8, 0.95, 16, 3))[-1]
    assert f"the {dropped} oldest messages were left out" in capsys.readouterr().out  # gr.Info outside a request
    assert reply_text(final) == short.chat(kept, 16, temperature=0.8, top_p=0.95, seed=3)
    assert len(final) == len(history) + 2  # the page keeps the whole conversation; only the prompt is cut


# -- a model without a chat template, and errors ----------------------------------------------------------------
def test_a_model_without_a_chat_template_continues_the_text(base_path, model):
    base = edgerun.load(base_path)
    assert not base.tokenizer.has_chat_template and model.tokenizer.has_chat_template
    assert chat.mode(base) == "completion" and chat.mode(model) == "chat"
    assert "completion mode" in chat.describe_model(base) and "chat mode" in chat.describe_model(model)
    app = chat.ChatApp(base)
    box, system = app.mode_fields()
    assert "continue" in box["placeholder"] and system["interactive"] is False
    box, system = chat.ChatApp(model).mode_fields()
    assert box["placeholder"].startswith("Message") and system["interactive"] is True

    # the message is the prompt, as written (the system prompt has no place in it); the reply is its continuation
    history = list(app.respond("Once upon a time", [], "Be brief.", 0.8, 0.95, 16, 7))[-1]
    want = base.generate("Once upon a time", 16, temperature=0.8, top_p=0.95, seed=7)
    assert [m["role"] for m in history] == ["user", "assistant"] and reply_text(history) == want != ""
    assert base.stats()["prompt_tokens"] == len(base.tokenizer.encode("Once upon a time"))
    # the next message is a text of its own, continued in turn
    history = list(app.respond("The river", history, "", 0.8, 0.95, 8, 3))[-1]
    assert len(history) == 4 and reply_text(history) == base.generate("The river", 8, temperature=0.8,
                                                                       top_p=0.95, seed=3)


class FailingExperts:
    """An experts container that fails like a disk that went away, after `calls` calls."""

    def __init__(self, inner, calls: int):
        self.inner, self.calls = inner, calls

    def __call__(self, layer, x, idx, weights):
        self.calls -= 1
        if self.calls < 0:
            raise OSError(5, "Input/output error")
        return self.inner(layer, x, idx, weights)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_an_error_in_a_reply_is_one_line_in_the_chat(paths, base_path):
    held = edgerun.load(paths["hf"])
    app = chat.ChatApp(held)
    full = api_reply(held, "Tell me a story", 40, 5)
    inner = held.use_experts(FailingExperts(held.experts, calls=4 * 11))  # the prompt, then 10 tokens
    try:
        history = list(app.respond("Tell me a story", [], *SETTINGS, 40, 5))[-1]
    finally:
        held.use_experts(inner)
    # the text so far stays; the error follows it in one line, with the exception's type
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    partial = chat.message_text(history[1]["content"])
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert chat.is_error(history[2]) and not chat.is_error(history[1])
    assert history[2]["content"] == "⚠ **error:** OSError: [Errno 5] Input/output error"
    # the error line is the page's, not the conversation's: the next prompt leaves it out
    follow = list(app.respond("Go on", history, *SETTINGS, 6, 2))[-1]
    messages = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": partial},
                {"role": "user", "content": "Go on"}]
    assert chat.to_messages(follow[:-1], "") == messages
    assert reply_text(follow) == held.chat(messages, 6, temperature=0.8, top_p=0.95, seed=2)
    assert chat.ChatApp.drop_reply(history) == history[:1]  # Regenerate drops the error too

    # an error before the first token (a text longer than the context) takes the reply's place
    short = chat.ChatApp(edgerun.load(base_path, context_length=32))
    history = list(short.respond("many words " * 40, [], *SETTINGS, 8, 1))[-1]
    assert [m["role"] for m in history] == ["user", "assistant"] and chat.is_error(history[1])
    line = history[1]["content"]
    assert "the prompt has" in line and "context holds 32" in line and "\n" not in line
    history = list(chat.ChatApp(None).respond("Hi", [], *SETTINGS, 8, 1))[-1]
    assert chat.is_error(history[-1]) and "no model is loaded" in history[-1]["content"]
    line = chat.error_message(ValueError("first line\n  second line"))["content"]
    assert line == "⚠ **error:** ValueError: first line second line"


# -- several tabs, Stop, and closed tabs -------------------------------------------------------------------------
def test_two_chats_at_once_are_queued_and_both_answered(served, model):
    from gradio_client import Client

    app, page, url = served
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    job_a = a.submit("First question", [], *SETTINGS, 40, 21, api_name="/chat")
    job_b = b.submit("Second question", [], *SETTINGS, 40, 22, api_name="/chat")
    hist_a, hist_b = job_a.result(timeout=120), job_b.result(timeout=120)
    assert reply_text(hist_a) == api_reply(model, "First question", 40, 21)
    assert reply_text(hist_b) == api_reply(model, "Second question", 40, 22)


def test_stop_ends_the_generation_and_frees_the_model(served, model):
    from gradio_client import Client

    app, page, url = served
    client = Client(url, verbose=False)
    job = client.submit("Go on forever", [], *SETTINGS, 3000, 1, api_name="/chat")
    wait_until(lambda: model.stats()["generated_tokens"] >= 5 and app.generating, what="the reply to start")
    job.cancel()
    wait_until(lambda: not app.generating and model_is_free(model), timeout=10, what="the model to be free")
    assert model.stats()["generated_tokens"] < 3000


def _fn_index(page, api_name: str) -> int:
    return next(i for i, fn in page.fns.items() if fn.api_name == api_name)


def test_a_closed_tab_stops_its_generation(served, model):
    """A page that goes away mid-reply (its event stream closes) stops the generation: the model is free long
    before the token limit, and the next chat is answered."""
    app, page, url = served
    session = uuid.uuid4().hex
    with httpx.Client(base_url=url + "gradio_api/", timeout=30) as http:
        joined = http.post("queue/join", json={"data": ["Go on forever", [], *SETTINGS, 3000, 1],
                                               "fn_index": _fn_index(page, "chat"), "session_hash": session,
                                               "event_data": None, "trigger_id": None})
        assert joined.status_code == 200, joined.text
        with http.stream("GET", "queue/data", params={"session_hash": session}) as stream:
            updates = 0
            for line in stream.iter_lines():
                updates += '"process_generating"' in line
                if updates >= 5:
                    break  # leaving the block closes the connection, as a closed tab does
    wait_until(lambda: not app.generating and model_is_free(model), timeout=15, what="the model to be free")
    assert model.stats()["generated_tokens"] < 3000
    from gradio_client import Client

    history = Client(url, verbose=False).predict("Still there?", [], *SETTINGS, 6, 2, api_name="/chat")
    assert reply_text(history) == api_reply(model, "Still there?", 6, 2)


def test_a_closed_tab_stops_its_generation_even_before_its_event_stream_opens(served, model):
    """The page's heartbeat connection ends with the tab: its session's reply stops, even where the event
    stream that gradio watches for disconnects was never opened (a tab closed right after sending)."""
    app, page, url = served
    session = uuid.uuid4().hex
    with httpx.Client(base_url=url + "gradio_api/", timeout=30) as http:
        with http.stream("GET", f"heartbeat/{session}") as heartbeat:
            lines = heartbeat.iter_lines()  # kept open until the block ends, as a page keeps it
            assert "ALIVE" in next(lines)
            history = [{"role": "user", "content": [{"type": "text", "text": "Go on forever"}]}]
            reply_fn = next(i for i, fn in page.fns.items() if fn.fn == app.reply)  # the page's own event
            joined = http.post("queue/join", json={"data": [history, *SETTINGS, 3000, 1], "fn_index": reply_fn,
                                                   "session_hash": session, "event_data": None, "trigger_id": None})
            assert joined.status_code == 200, joined.text
            wait_until(lambda: app.generating and not model_is_free(model) and model.stats()["generated_tokens"] >= 5,
                       what="the reply to start")
    wait_until(lambda: not app.generating and model_is_free(model), timeout=60, what="the model to be free")
    assert model.stats()["generated_tokens"] < 3000


# -- loading models from the page --------------------------------------------------------------------------------
def test_loading_a_model_from_the_page_reports_errors_in_it(paths, tmp_path):
    app = chat.ChatApp(edgerun.load(paths["hf"]), (str(paths["hf"]), "none", ""))
    for path, quant, ram, expected in [
        (str(tmp_path / "missing"), "none", "", "missing"),
        (str(tmp_path), "none", "", "config.json"),
        (str(paths["q4"]), "none", "1MiB", "minimum"),
        (str(paths["hf"]), "none", "lots", "size"),
    ]:
        with pytest.warns(UserWarning):  # gr.Warning outside a request
            status, header = app.load_model(path, quant, ram)
        assert "er-error" in status and expected in status and "Traceback" not in status
        assert app.model is not None and "kept" in status and "hf" in header  # the previous model is back
    status, header = app.load_model(str(paths["q4"]), "none", "")
    assert "loaded" in status and app.model.stats()["quant"] == "q4" and "q4" in header
    history = list(app.respond("Hi", [], *SETTINGS, 5, 1))[-1]
    assert reply_text(history)


def test_a_model_loaded_from_the_page_keeps_the_command_lines_options(paths):
    """The page has fields for the path, quant and RAM; the context, threads and GPU tier the command was started
    with apply to every model loaded from it, a failed load's restored one too."""
    options = {"context_length": 96, "gpu": "4MB", "device": "cpu", "misses": "cpu"}
    app = chat.ChatApp(None, (str(paths["q4"]), "none", ""), options)
    status, _ = app.load_model(str(paths["q4"]), "none", "")
    stats = app.model.stats()
    assert "loaded" in status and app.model.context_length == 96
    assert stats["device"] == "cpu" and stats["misses"] == "cpu" and stats["memory_plan"]["gpu"]["budget_bytes"] == 4e6
    with pytest.warns(UserWarning):
        status, _ = app.load_model(str(paths["q4"]), "none", "1MiB")
    assert "kept" in status and app.model.context_length == 96 and app.model.stats()["device"] == "cpu"


# -- the command -------------------------------------------------------------------------------------------------
def test_chat_command_rejects_bad_arguments(paths, tmp_path, capsys):
    cases = [
        (["chat", "--port", "abc"], "invalid int value"),
        (["chat", "--port", "70000"], "between 1 and 65535"),
        (["chat", str(tmp_path / "nowhere")], "nowhere"),
        (["chat", str(paths["q4"]), "--ram", "1MiB"], "minimum"),
        (["chat", "--share", "maybe"], "invalid choice"),
        (["chat", "--substitute-below", "2"], "routing weights go from 0 up to 1"),
        (["chat", "--server", "http://127.0.0.1:9/v1", "--skip-below", "0.2"], "options of approximate decoding"),
    ]
    def one_error_line(expected: str) -> None:
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if "error" in line]
        assert len(errors) == 1 and expected in errors[0] and err[-1] == errors[0], err
        assert not any("Traceback" in line for line in err)

    for argv, expected in cases:
        assert main(argv) == 2, argv
        one_error_line(expected)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["chat", str(paths["hf"]), "--port", str(s.getsockname()[1])]) == 2
        one_error_line("in use")


def test_the_chat_command_keeps_room_in_the_budget_for_its_server(paths, monkeypatch, capsys):
    """The page's server grows as tabs open and chat, after the model is planned: the command loads the model with
    a reserve for it, and so does the page's own loader (the same options)."""
    from edgerun.runtime.placement import BudgetError

    asked = []

    def load(source, **kwargs):
        asked.append(kwargs)
        raise BudgetError("the budget is below the minimum")
    monkeypatch.setattr(edgerun, "load", load)
    assert main(["chat", str(paths["q4"]), "--ram", "2GiB", "--port", str(chat.free_port(start=7950))]) == 2
    assert "minimum" in capsys.readouterr().err
    assert asked[0]["ram"] == "2GiB" and asked[0]["reserve"] == chat.SERVER_RESERVE > 0
    app = chat.ChatApp(None, (str(paths["q4"]), "none", ""), {"reserve": chat.SERVER_RESERVE})
    with pytest.warns(UserWarning):  # gr.Warning outside a request
        app.load_model(str(paths["q4"]), "none", "3GiB")
    assert asked[1]["ram"] == "3GiB" and asked[1]["reserve"] == chat.SERVER_RESERVE


def test_chat_command_serves_the_page(paths):
    port = chat.free_port(start=7900)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Ctrl+C as a terminal delivers it: with SIGINT's default action, which a shell running the tests in the
    # background leaves ignored (and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "edgerun.cli", "chat", str(paths["hf"]), "--port", str(port),
                             "--skip-below", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = ""
        end = time.monotonic() + 90
        while "serving" not in line and time.monotonic() < end and proc.poll() is None:
            line = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}/"
        assert url in line, (line, proc.poll())
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "edgerun chat" in page.text
    finally:
        proc.send_signal(2)  # Ctrl+C
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert proc.returncode == 130 and "interrupted" in err, (proc.returncode, err[-2000:])
    assert "note: every expert is in RAM, so --skip-below changes nothing" in err  # the option reached the model


# -- the page in a real browser ----------------------------------------------------------------------------------
@contextmanager
def headless_browser():
    """Chromium driven by Playwright (the test is skipped without them)."""
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.skip("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright python package is not installed (pip install playwright)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                                    args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_the_page_in_a_headless_browser(served, model, tmp_path):
    app, page, url = served
    with headless_browser() as browser:
        tab = browser.new_page(viewport={"width": 1440, "height": 900})
        tab.goto(url)
        box = tab.locator("#er-input textarea")
        box.wait_for(state="visible", timeout=30_000)
        tab.locator("#er-seed input").fill("9")
        tab.locator("#er-max-tokens input[type=number]").fill("24")
        tab.locator("#er-max-tokens input[type=number]").press("Enter")
        box.fill("Hello from the browser")
        box.press("Enter")
        want = api_reply(model, "Hello from the browser", 24, 9)
        chat_box = tab.locator("#er-chat")
        chat_box.get_by_text("Hello from the browser").wait_for(timeout=30_000)
        tab.wait_for_function("t => document.querySelector('#er-chat').innerText.includes(t)",
                              arg=want.strip()[:20], timeout=60_000)
        tab.wait_for_function("() => document.querySelector('#er-stats').innerText"
                              ".includes('last reply: 24 tokens')", timeout=30_000)
        stats = tab.locator("#er-stats").inner_text()
        assert re.search(r"DECODE\s*[\d.]+\s*tok/s", stats, re.I), stats
        assert re.search(r"FIRST TOKEN\s*\d+\s*ms", stats, re.I), stats
        assert "24 tokens" in stats
        assert tab.locator("#er-heatmap .er-c").count() == 32
        assert "chat mode" in tab.locator("#er-model-line").inner_text()
        shot = tmp_path / "chat.png"
        tab.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        # a second tab asks for a long reply and is closed in the middle of it: the generation stops
        other = browser.new_page()
        other.goto(url)
        other.locator("#er-input textarea").wait_for(state="visible", timeout=30_000)
        other.locator("#er-max-tokens input[type=number]").fill("3000")
        other.locator("#er-max-tokens input[type=number]").press("Enter")
        other.locator("#er-input textarea").fill("Go on forever")
        other.locator("#er-input textarea").press("Enter")
        wait_until(lambda: app.generating and not model_is_free(model) and model.stats()["generated_tokens"] >= 5,
                   what="the long reply")
        other.close()
        wait_until(lambda: not app.generating and model_is_free(model), timeout=60, what="the model to be free")
        assert model.stats()["generated_tokens"] < 3000


def test_a_base_model_in_a_headless_browser(base_path, tmp_path):
    """A model without a chat template: the page says it is in completion mode and shows the continuation of the
    text sent; an error a reply hits is one line in the chat, and the next text is continued again. A model with a
    template loaded from the page brings the chat mode back."""
    base = edgerun.load(base_path, context_length=64)
    app = chat.ChatApp(base, (str(base_path), "none", ""), {"context_length": 64})
    with serving(app) as (page, url), headless_browser() as browser:
        tab = browser.new_page(viewport={"width": 1440, "height": 900})
        tab.goto(url)
        box = tab.locator("#er-input textarea")
        box.wait_for(state="visible", timeout=30_000)
        tab.wait_for_function("() => document.querySelector('#er-model-line').innerText.includes('completion mode')",
                              timeout=30_000)
        tab.wait_for_function("() => document.querySelector('#er-system textarea').disabled", timeout=30_000)
        assert "continue" in box.get_attribute("placeholder")
        # the max-new-tokens field comes down to the 64-token context
        tab.wait_for_function("() => document.querySelector('#er-max-tokens input[type=number]').value === '64'",
                              timeout=30_000)
        tab.locator("#er-seed input").fill("9")
        tab.locator("#er-max-tokens input[type=number]").fill("24")
        tab.locator("#er-max-tokens input[type=number]").press("Enter")
        replies = tab.locator("#er-chat .bot-row")
        for text in ("Once upon a time", "many words " * 40, "The river"):
            if len(text) < 100:
                want = base.generate(text, 24, temperature=0.8, top_p=0.95, seed=9)
                assert want.strip()
            count = replies.count()
            box.fill(text)
            box.press("Enter")
            tab.wait_for_function("n => document.querySelectorAll('#er-chat .bot-row').length > n", arg=count,
                                  timeout=60_000)
            reply = replies.last
            if len(text) < 100:  # the continuation of the text, as the API gives it
                tab.wait_for_function("t => [...document.querySelectorAll('#er-chat .bot-row')].pop().innerText"
                                      ".includes(t)", arg=want.strip()[:20], timeout=60_000)
                wait_until(lambda: not app.generating and model_is_free(base), what="the end of the reply")
            else:  # longer than the 64-token context: the error, in one line (once the row has its text)
                tab.wait_for_function("() => [...document.querySelectorAll('#er-chat .bot-row')].pop().innerText"
                                      ".includes('error')", timeout=60_000)
                line = reply.inner_text().strip()
                assert line.startswith("⚠ error: the prompt has") and "context holds 64" in line, line
                assert "\n" not in line and "Traceback" not in tab.locator("#er-chat").inner_text()
        shot = tmp_path / "completion.png"
        tab.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        tab.locator("#er-path textarea").fill("")  # the demo model, which has a chat template
        tab.locator("#er-load").click()
        tab.wait_for_function("() => document.querySelector('#er-model-line').innerText.includes('chat mode')",
                              timeout=60_000)
        tab.wait_for_function("() => !document.querySelector('#er-system textarea').disabled", timeout=30_000)
        assert box.get_attribute("placeholder").startswith("Message") and chat.mode(app.model) == "chat"
