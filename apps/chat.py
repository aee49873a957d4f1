"""The edgerun chat app: a local web page to chat with a model and watch its experts move between disk and RAM.

    edgerun chat [MODEL] [--quant q4] [--ram 8GiB] [--port N]

Built with Gradio on edgerun's public API only (edgerun.load, Model.stream_chat, Model.stream, Model.stats,
Model.expert_activity and edgerun.units). One model serves every open tab: replies are generated one at a time,
in the order they were asked for, and a reply stops when its tab is closed or its Stop button is pressed.
A model without a chat template (a base model) is run in completion mode: the model continues each message as
written. An error a reply hits is shown in the chat in one line.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import html
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app reports nothing to anyone

import gradio as gr  # noqa: E402

import edgerun  # noqa: E402
from edgerun.units import format_size  # noqa: E402

REFRESH_SECONDS = 1.0  # the live panel's update interval
UPDATE_SECONDS = 1 / 30  # the reply is sent to the page at most this often: each update costs the server time
ACTIVITY_TOKENS = 32  # the heatmap shows the experts chosen by this many latest tokens
DEFAULT_PORT = 7860
# what the page's server still takes after the model loads, kept out of a RAM budget's split: with three tabs open
# and chatting, a store run at its smallest budget without it (512 MiB) peaked at 520 MiB; with it, 2.5 MiB over its
# smallest budget (536.5 MiB), at 510 MiB
SERVER_RESERVE = 32 << 20
QUANTS = ["none", "q8", "q4"]
FINISH = {"stop": "end of text", "length": "token limit", "context": "context full", "": "-"}
ERROR_ID = "er-error"  # the metadata id of a chat message that reports an error: shown, never sent to the model
PLACEHOLDERS = {"chat": "Message (Enter sends, Shift+Enter: new line)",
                "completion": "Text for the model to continue (Enter sends, Shift+Enter: new line)"}


# -- formatting --------------------------------------------------------------------------------------------------
def _card(label: str, value: str, unit: str = "", note: str = "") -> str:
    unit_html = f'<span class="er-unit">{unit}</span>' if unit else ""
    note_html = f'<div class="er-note">{note}</div>' if note else ""
    return (f'<div class="er-card"><div class="er-label">{label}</div>'
            f'<div class="er-value">{value}{unit_html}</div>{note_html}</div>')


def render_stats(stats: dict, generating: bool) -> str:
    """The figures of the current (or last) reply and the memory by tier, as HTML."""
    tokens = stats.get("generated_tokens", 0)
    if generating:
        status = f'<span class="er-dot er-busy"></span>generating: {tokens} tokens so far'
    elif stats.get("finish_reason"):
        status = (f'<span class="er-dot"></span>last reply: {tokens} tokens, stopped at '
                  f'{FINISH.get(stats["finish_reason"], stats["finish_reason"])}')
    else:
        status = '<span class="er-dot"></span>ready: no reply yet'
    ttft = stats.get("time_to_first_token_s") or 0.0
    prefilled = stats.get("prompt_tokens", 0) - stats.get("cached_prompt_tokens", 0)
    cards = [
        _card("decode", f"{stats.get('decode_tokens_per_s', 0.0):.1f}", "tok/s", f"{tokens} tokens"),
        _card("first token", f"{ttft * 1000:.0f}" if ttft else "-", "ms" if ttft else "",
              f"prefill {stats.get('prefill_tokens_per_s', 0.0):.0f} tok/s"),
        _card("prompt", f"{stats.get('prompt_tokens', 0)}", "tokens",
              f"{stats.get('cached_prompt_tokens', 0)} cached, {prefilled} new"),
    ]
    if stats.get("offload"):
        cards += [
            _card("expert hits", f"{100 * stats.get('hit_rate', 0.0):.0f}", "%",
                  f"+{100 * stats.get('prefetch_hit_rate', 0.0):.0f}% prefetched in time"),
            _card("prefetch recall", f"{100 * stats.get('prefetch_recall', 0.0):.0f}", "%",
                  f"depth {stats.get('prefetch_depth', 0)} layers"),
            _card("read from disk", format_size(stats.get("bytes_read", 0)), "",
                  f"{format_size(stats.get('bytes_read_per_token', 0.0))} per token"),
        ]
        approximate = [(share, what) for share, what in (
            (stats.get("substituted_rate", 0.0), "replaced"), (stats.get("skipped_rate", 0.0), "left out"),
            (stats.get("low_served_rate", 0.0), "from low-bit copies")) if share]
        if any(stats.get(k) for k in ("substitute_below", "skip_below", "low_below", "low_when_late")):
            cards.append(_card("approximate", f"{100 * sum(share for share, _ in approximate):.0f}", "%",
                               "of decoded experts: " + (", ".join(f"{100 * share:.0f}% {what}"
                                                                   for share, what in approximate) or "none yet")))
    else:
        cards += [
            _card("expert hits", "100", "%", "every expert in memory"),
            _card("prefetch recall", "-", "", "nothing to prefetch"),
            _card("read from disk", "0 B", "", "weights stay in RAM"),
        ]
    return (f'<div class="er-live"><div class="er-status">{status}</div>'
            f'<div class="er-cards">{"".join(cards)}</div>{render_memory(stats)}</div>')


TIERS = (  # (plan key, label, CSS class)
    ("baseline_bytes", "runtime and server", "er-t0"),  # the server: its share of the budget (SERVER_RESERVE)
    ("resident_bytes", "resident weights", "er-t1"),
    ("kv_cache_bytes", "KV cache", "er-t2"),
    ("scratch_bytes", "scratch", "er-t3"),
    ("expert_cache_bytes", "expert slots", "er-t4"),
)


def render_memory(stats: dict) -> str:
    """Memory by tier against the RAM budget (a store), or the weights and KV cache (a model held in RAM)."""
    plan = stats.get("memory_plan")
    peak = stats.get("peak_rss_bytes", 0)
    if plan:
        budget = plan["budget_bytes"]
        parts = [(label, plan[key] + (plan["safety_bytes"] if key == "scratch_bytes" else 0), cls)
                 for key, label, cls in TIERS]
        if plan["slots"] >= plan["total_experts"]:
            note = f"all {plan['total_experts']} experts fit in the budget: mapped from the store, none is read"
        else:
            note = (f"{plan['slots']} expert slots of {format_size(plan['slot_bytes'])} hold "
                    f"{100 * plan['slots'] / plan['total_experts']:.0f}% of the {plan['total_experts']} experts; "
                    "the others are read from disk when needed")
        title = f"memory: peak {format_size(peak)} of a {format_size(budget)} budget"
    else:
        budget = max(peak, 1)
        weights = stats.get("weights_bytes", 0)
        kv = stats.get("kv_cache_bytes", 0)
        parts = [("runtime", max(0, peak - weights - kv), "er-t0"), ("weights (experts included)", weights, "er-t1"),
                 ("KV cache", kv, "er-t2")]
        note = ("all experts are in memory (no RAM budget applies); load a model with quant q8/q4 and a RAM "
                "budget to stream its experts from disk")
        title = f"memory: peak {format_size(peak)}"
    total = max(budget, sum(p[1] for p in parts), 1)
    bar = "".join(f'<div class="er-seg {cls}" style="width:{100 * n / total:.2f}%" title="{label}: '
                  f'{format_size(n)}"></div>' for label, n, cls in parts if n > 0)
    marker = (f'<div class="er-peak" style="left:{min(100.0, 100 * peak / total):.2f}%" '
              f'title="peak RSS {format_size(peak)}"></div>' if plan else "")
    legend = "".join(f'<span class="er-key"><i class="{cls}"></i>{label} {format_size(n)}</span>'
                     for label, n, cls in parts)
    return (f'<div class="er-mem"><div class="er-mem-title">{title}</div>'
            f'<div class="er-bar">{bar}{marker}</div><div class="er-legend">{legend}</div>'
            f'<div class="er-note">{note}</div></div>') + render_gpu(stats)


def render_gpu(stats: dict) -> str:
    """The GPU tier's memory against its budget and where the last reply's experts ran; empty without one."""
    gpu = (stats.get("memory_plan") or {}).get("gpu")
    if not gpu:
        return ""
    parts = [("dense weights", gpu["dense_bytes"], "er-t1"), ("KV cache", gpu["kv_cache_bytes"], "er-t2"),
             ("scratch", gpu["scratch_bytes"] + gpu["reserve_bytes"], "er-t3"),
             ("expert slots", gpu["expert_cache_bytes"], "er-t4")]
    total = max(gpu["budget_bytes"], sum(n for _, n, _ in parts), 1)
    bar = "".join(f'<div class="er-seg {cls}" style="width:{100 * n / total:.2f}%" title="{label}: '
                  f'{format_size(n)}"></div>' for label, n, cls in parts if n > 0)
    legend = "".join(f'<span class="er-key"><i class="{cls}"></i>{label} {format_size(n)}</span>'
                     for label, n, cls in parts)
    note = (f"{gpu['slots']} expert slots; last reply: {100 * stats.get('gpu_hit_rate', 0):.0f}% of decoded experts "
            f"found there, {100 * stats.get('decode_gpu_expert_share', 0):.0f}% run there, "
            f"{format_size(stats.get('h2d_bytes_per_token', 0))} copied per token (misses: {stats.get('misses')})")
    return (f'<div class="er-mem"><div class="er-mem-title">GPU ({html.escape(gpu["device"])}): '
            f'{format_size(gpu["budget_bytes"])} budget</div><div class="er-bar">{bar}</div>'
            f'<div class="er-legend">{legend}</div><div class="er-note">{note}</div></div>')


def render_heatmap(activity: dict) -> str:
    """A layers x experts grid: the fill shows how many recent tokens chose the expert, the outline whether
    it is in a GPU slot (thick), in RAM (solid), being read (pulsing) or on disk (dashed)."""
    E, layers, tokens = activity["num_experts"], activity["layers"], activity["tokens"]
    if not layers:
        return '<div class="er-heat-empty">this model has no MoE layers</div>'
    head = '<div class="er-hl"></div>' + "".join(
        f'<div class="er-hx">{e if E <= 16 or e % 8 == 0 else ""}</div>' for e in range(E))
    rows = []
    for i, layer in enumerate(layers):
        cells = [f'<div class="er-hl">{layer}</div>']
        for e in range(E):
            n = activity["used"][i][e]
            share = n / tokens if tokens else 0.0
            state = ("er-loading" if activity["loading"][i][e] else "er-gpu" if activity["on_gpu"][i][e] else
                     "er-ram" if activity["resident"][i][e] else "er-disk")
            where = {"er-loading": "being read", "er-gpu": "on the GPU", "er-ram": "in RAM",
                     "er-disk": "on disk"}[state]
            style = f"--u:{share:.3f}" if n else ""
            cells.append(f'<div class="er-c {state}{" er-used" if n else ""}" style="{style}" '
                         f'title="layer {layer}, expert {e}: chosen by {n} of the last {tokens} tokens, {where}">'
                         f'</div>')
        rows.append("".join(cells))
    size = "er-small" if len(layers) > 24 or E > 32 else ""
    resident, on_gpu = sum(map(sum, activity["resident"])), sum(map(sum, activity["on_gpu"]))
    where = ("every expert is in memory" if activity["all_resident"] else
             f"{resident} of {len(layers) * E} experts in RAM, {sum(map(sum, activity['loading']))} being read")
    if on_gpu:
        where += f", {on_gpu} on the GPU"
    gpu_key = '<span class="er-key"><i class="er-sw er-gpu"></i>on the GPU</span>' if on_gpu else ""
    return (f'<div class="er-heatwrap"><div class="er-heat-title">experts: layers x experts, last {tokens} '
            f'tokens; {where}</div><div class="er-heat {size}" style="grid-template-columns:2.2em repeat({E},'
            f'minmax(0,1fr))">{head}{"".join(rows)}</div><div class="er-legend">'
            '<span class="er-key"><i class="er-sw er-used" style="--u:1"></i>chosen often</span>'
            '<span class="er-key"><i class="er-sw er-used" style="--u:0.25"></i>chosen rarely</span>'
            f'{gpu_key}<span class="er-key"><i class="er-sw er-ram"></i>in RAM</span>'
            '<span class="er-key"><i class="er-sw er-loading"></i>being read</span>'
            '<span class="er-key"><i class="er-sw er-disk"></i>on disk</span></div></div>')


def mode(model: edgerun.Model | None) -> str:
    """"chat" for a model with a chat template; "completion" for one without (a base model), whose replies
    continue the last message's text as written."""
    return "completion" if model is not None and not model.tokenizer.has_chat_template else "chat"


def render_mode(model: edgerun.Model | None) -> str:
    if mode(model) == "completion":
        return ('<span class="er-mode er-completion" title="the model has no chat template: each message is the '
                'text of a prompt, and the reply is its continuation">completion mode: the model continues your '
                'text</span>')
    return ('<span class="er-mode" title="messages and replies are put in the model\'s chat template">chat mode'
            '</span>')


def describe_model(model: edgerun.Model | None) -> str:
    """One line on the loaded model for the page header, with the mode the page chats in."""
    if model is None:
        return '<div class="er-model">no model loaded: open <b>Model</b> and load one</div>'
    s = model.stats()
    spec = model.spec
    moe = len(spec.moe_layers)
    quant = s.get("quant", "none")
    weights = f"weights {quant}" if quant not in (None, "none") else f"weights {s.get('dtype')}, unconverted"
    where = ("all experts in memory" if not s.get("offload") else
             f"{s['expert_slots']} of {s['experts_total']} experts in RAM, the rest on disk")
    if "gpu_expert_slots" in s:
        where += f"; {s['gpu_expert_slots']} of {s['experts_total']} in GPU slots on {s['device']}"
    budget = f", budget {format_size(s['ram_budget_bytes'])}" if s.get("ram_budget_bytes") else ""
    name = html.escape(Path(str(s.get("path", "model"))).name)
    return (f'<div class="er-model"><b>{name}</b><span>{html.escape(str(s.get("model_type")))}</span>'
            f'<span>{moe} MoE layers x {spec.num_experts} experts, top-{spec.top_k}</span>'
            f'<span>{weights}</span><span>context {s["context_length"]}</span>'
            f'<span>{where}{budget}</span>{render_mode(model)}</div>')


def message_text(content) -> str:
    """The text of a chatbot message's content (a string, a text part, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(message_text(c) for c in content)
    return ""


def error_message(error: BaseException | str) -> dict:
    """A chat message that reports an error in one line (an exception's type is named unless it is edgerun's)."""
    if isinstance(error, BaseException) and not isinstance(error, edgerun.EdgerunError):
        error = f"{type(error).__name__}: {error}"
    line = " ".join(str(error).split()) or "unknown error"
    return {"role": "assistant", "content": f"⚠ **error:** {line}", "metadata": {"id": ERROR_ID}}


def is_error(message) -> bool:
    return isinstance(message, dict) and (message.get("metadata") or {}).get("id") == ERROR_ID


def to_messages(history: list, system: str | None) -> list[dict]:
    """Chatbot history as edgerun chat messages, the system prompt first (error lines are left out)."""
    out = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for m in history or []:
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("user", "assistant") and not is_error(m):
            out.append({"role": role, "content": message_text(m.get("content"))})
    return out


def prompt_tokens(model: edgerun.Model, messages: list[dict]) -> int:
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return len(model.tokenizer.encode(text, add_special_tokens=False))


def fit_context(model: edgerun.Model, messages: list[dict], max_tokens: int) -> tuple[list[dict], int]:
    """(messages, how many were left out): the oldest turns go (never the system prompt nor the last message)
    until the prompt leaves room in the context for min(max_tokens, a quarter of the context) new tokens."""
    ctx = model.context_length
    room = max(1, min(max_tokens, ctx // 4))
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(turns) > 1 and prompt_tokens(model, system + turns) + room > ctx:
        turns = turns[1:]
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation starts with the user
            turns = turns[1:]
            dropped += 1
    return system + turns, dropped


# -- the app ------------------------------------------------------------------------------------------------------
class ChatApp:
    """The page and its handlers over one model, shared by every tab. The page chats through the model's chat
    template, or, for a model without one, has the model continue each message (completion mode)."""

    def __init__(self, model: edgerun.Model | None, source: tuple[str, str, str] = ("", "none", ""),
                 options: dict | None = None):
        self.model = model
        self.source = source  # (path as typed, quant, ram) of the loaded model, to reload it after a failed load
        # what the command line gave edgerun.load besides the page's fields (context, threads, the GPU tier), for
        # every model loaded from the page too
        self.options = dict(options or {})
        self._active = 0  # generations running now
        self._count_lock = threading.Lock()
        self._turn = threading.Lock()
        self._running: set[str] = set()  # sessions (tabs) whose reply is being generated
        self._gone: set[str] = set()  # of those, the ones whose tab was closed

    # -- chat --------------------------------------------------------------------------------------------------
    @staticmethod
    def add_message(message: str, history: list) -> tuple[list, str]:
        """The user's message joins the chat at once (the reply may wait in the queue); the box empties."""
        message = (message or "").strip()
        history = list(history or [])
        if not message:
            return history, ""
        return history + [{"role": "user", "content": message}], ""

    @staticmethod
    def drop_reply(history: list) -> list:
        """The chat without the replies after its last user message (Regenerate)."""
        history = list(history or [])
        while history and history[-1].get("role") != "user":
            history.pop()
        if not history:
            gr.Warning("nothing to regenerate: send a message first")
        return history

    def reply(self, history: list, system: str, temperature: float, top_p: float, max_tokens: float,
              seed: float | None, request: gr.Request | None = None) -> Iterator[list]:
        """Stream the model's reply to the chat's last (user) message into the chat, piece by piece."""
        with self._turn:  # one reply (or model load) at a time drives the model thread
            yield from self._reply(history, system, temperature, top_p, max_tokens, seed,
                                   getattr(request, "session_hash", None))

    def _reply(self, history, system, temperature, top_p, max_tokens, seed, session) -> Iterator[list]:
        history = list(history or [])
        model = self.model
        if not history or history[-1].get("role") != "user":
            yield history
            return
        if model is None:
            yield history + [error_message("no model is loaded: open Model and load one")]
            return
        answer = {"role": "assistant", "content": ""}
        sampling = dict(temperature=float(temperature), top_p=float(top_p), seed=_seed(seed))
        try:
            if mode(model) == "completion":  # no chat template: the last message is the text to continue
                prompt = message_text(history[-1].get("content"))
                pieces = on_model_thread(model.stream(prompt, int(max_tokens), **sampling))
            else:
                messages, dropped = fit_context(model, to_messages(history, system), int(max_tokens))
                if dropped:
                    gr.Info(f"the {dropped} oldest messages were left out: the conversation no longer fits the "
                            f"model's {model.context_length}-token context")
                pieces = on_model_thread(model.stream_chat(messages, int(max_tokens), **sampling))
        except Exception as e:  # noqa: BLE001 - shown in the chat in one line, never as a traceback
            yield history + [error_message(e)]
            return
        history.append(answer)
        with self._count_lock:
            self._active += 1
            self._running.add(session)
        try:
            yield history
            text, shown = "", time.monotonic()
            for piece in pieces:
                if session in self._gone:
                    return  # the tab was closed, and gradio's event stream had not noticed
                text += piece
                answer["content"] = text
                if time.monotonic() - shown >= UPDATE_SECONDS:  # a fast model's pieces go out together
                    shown = time.monotonic()
                    yield history
            if not text:
                answer["content"] = "*(the model ended its reply without text)*"
            yield history
        except Exception as e:  # noqa: BLE001 - the text so far stays, the error follows it in one line
            if not answer["content"]:
                history.pop()
            yield history + [error_message(e)]
        finally:
            pieces.close()  # a closed tab or Stop ends here: the model stops generating and is free again
            with self._count_lock:
                self._active -= 1
                self._running.discard(session)
                self._gone.discard(session)

    def respond(self, message: str, history: list, system: str, temperature: float, top_p: float,
                max_tokens: float, seed: float | None, request: gr.Request | None = None) -> Iterator[list]:
        """add_message, then reply: the whole turn in one call (API clients, Python callers)."""
        yield from self.reply(self.add_message(message, history)[0], system, temperature, top_p, max_tokens, seed,
                              request)

    def tab_closed(self, request: gr.Request) -> None:
        """A page's session ended (gradio's heartbeat connection closed): stop its reply, if one is running."""
        with self._count_lock:
            if request.session_hash in self._running:
                self._gone.add(request.session_hash)

    @property
    def generating(self) -> bool:
        return self._active > 0

    # -- the live panel ----------------------------------------------------------------------------------------
    def live(self) -> tuple[str, str, str]:
        """(the model line, figures and memory, heatmap) as HTML, refreshed every REFRESH_SECONDS (so every tab
        also sees a model another tab loaded)."""
        model = self.model
        if model is None:
            return describe_model(None), '<div class="er-live"><div class="er-status">no model loaded</div></div>', ""
        return (describe_model(model), render_stats(model.stats(), self.generating),
                render_heatmap(model.expert_activity(ACTIVITY_TOKENS)))

    def token_limit(self, current: float | None = None) -> dict:
        """The most new tokens one can ask for: the loaded model's context (a larger `current` value comes down to
        it, else the page would refuse every reply)."""
        limit = self.model.context_length if self.model is not None else 4096
        if current is not None and current > limit:
            return gr.update(maximum=limit, value=limit)
        return gr.update(maximum=limit)

    def mode_fields(self) -> tuple[dict, dict]:
        """(message box, system prompt) for the loaded model's mode: in completion mode the box asks for text to
        continue and the system prompt, which has no place in a plain prompt, is off."""
        current = mode(self.model)
        chatting = current == "chat"
        return (gr.update(placeholder=PLACEHOLDERS[current]),
                gr.update(interactive=chatting, info="" if chatting else
                          "not used in completion mode: the model has no chat template"))

    # -- loading a model ---------------------------------------------------------------------------------------
    def load_model(self, path: str, quant: str, ram: str, progress=gr.Progress(track_tqdm=True)) -> tuple[str, str]:
        """Replace the model by the one at path (empty: the demo model); errors become a message in the page."""
        path, ram = (path or "").strip(), (ram or "").strip()
        if getattr(self.model, "remote", False):
            return (_status(f"this page chats with the server at {html.escape(self.model.url)}; load another model "
                            f"there, or start `edgerun chat MODEL` without --server", error=True),
                    describe_model(self.model))
        if quant not in QUANTS:
            return _status(f"quant must be one of {', '.join(QUANTS)}", error=True), describe_model(self.model)
        progress(0, desc="releasing the current model")
        previous = self.source
        self.model = None  # the old model's memory goes first: a budget counts what the process already holds
        gc.collect()
        progress(0.05, desc=f"loading {path or 'the demo model'}")
        try:
            with self._turn:
                self.model = model_thread().call(functools.partial(open_model, path, quant, ram, **self.options))
            self.source = (path, quant, ram)
            s = self.model.stats()
            msg = _status(f"loaded **{html.escape(path or 'the demo model')}** in {s.get('load_seconds', 0):.1f} s")
        except edgerun.EdgerunError as e:
            msg = self._restore(previous, str(e))
        except Exception as e:  # noqa: BLE001 - whatever went wrong is shown in the page, never as a traceback
            msg = self._restore(previous, f"{type(e).__name__}: {e}")
        return msg, describe_model(self.model)

    def _restore(self, previous: tuple[str, str, str], error: str) -> str:
        gr.Warning(error)
        try:
            with self._turn:
                self.model = model_thread().call(functools.partial(open_model, *previous, **self.options))
            kept = f"; kept {previous[0] or 'the demo model'}"
        except Exception:  # noqa: BLE001
            self.model = None
            kept = ""
        return _status(f"{error}{kept}", error=True)

    # -- the page ----------------------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        model_path, model_quant, model_ram = self.source
        with gr.Blocks(title="edgerun chat", fill_height=True, fill_width=True) as page:
            with gr.Row(elem_id="er-header"):
                gr.HTML('<div class="er-brand">edgerun <span>chat</span></div>', elem_id="er-brand")
                header = gr.HTML(describe_model(self.model), elem_id="er-model-line", min_height=0)
            with gr.Sidebar(label="Settings", open=True, width=330, elem_id="er-sidebar"):
                gr.Markdown("### Model")
                path = gr.Textbox(model_path, label="Path", elem_id="er-path",
                                  placeholder="HF model directory, Grok-1 release, edgerun store, or repo id; "
                                              "empty: demo model")
                with gr.Row():
                    quant = gr.Dropdown(QUANTS, value=model_quant or "none", label="Quantization", min_width=90,
                                        info="q8/q4: convert once (cached)")
                    ram = gr.Textbox(model_ram, label="RAM budget", placeholder="e.g. 8GiB", min_width=90,
                                     info="empty: what is free")
                load = gr.Button("Load model", variant="secondary", elem_id="er-load")
                load_status = gr.Markdown("", elem_id="er-load-status")
                gr.Markdown("### Conversation")
                system = gr.Textbox("", label="System prompt", lines=3, elem_id="er-system",
                                    placeholder="Instructions the model sees before the chat")
                temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature",
                                        info="0: always the most likely token")
                top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.01, label="Top-p")
                max_tokens = gr.Slider(1, 4096, value=256, step=1, label="Max new tokens", elem_id="er-max-tokens")
                seed = gr.Number(-1, label="Seed", precision=0, info="-1: a new one every reply", elem_id="er-seed")
            with gr.Row(equal_height=False, elem_id="er-main"):
                with gr.Column(scale=6, min_width=380):
                    chatbot = gr.Chatbot(elem_id="er-chat", height="62vh", show_label=False, layout="bubble",
                                         buttons=["copy"], feedback_options=None,
                                         placeholder="<div class='er-empty'><b>Say something.</b><br>Replies "
                                                     "stream in as they are generated; the panel on the right "
                                                     "shows the runtime at work.</div>")
                    with gr.Row(elem_id="er-input-row"):
                        msg = gr.Textbox(show_label=False, placeholder=PLACEHOLDERS[mode(self.model)],
                                         lines=1, max_lines=8, scale=8, elem_id="er-input", autofocus=True)
                        send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="er-send")
                        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="er-stop")
                    with gr.Row(elem_id="er-actions"):
                        regen = gr.Button("Regenerate", size="sm", variant="secondary", elem_id="er-regen")
                        clear = gr.Button("Clear", size="sm", variant="secondary", elem_id="er-clear")
                with gr.Column(scale=5, min_width=340, elem_id="er-side"):
                    _, stats_html, heat_html = self.live()
                    stats_box = gr.HTML(stats_html, elem_id="er-stats")
                    heat_box = gr.HTML(heat_html, elem_id="er-heatmap")
            settings = [system, temperature, top_p, max_tokens, seed]
            common = dict(concurrency_id="generate", concurrency_limit=1, show_progress="minimal")
            answers = []
            for trigger in (msg.submit, send.click):
                added = trigger(self.add_message, [msg, chatbot], [chatbot, msg], queue=False, api_name=False)
                answers.append(added.then(self.reply, [chatbot, *settings], chatbot, api_name=False, **common))
            trimmed = regen.click(self.drop_reply, chatbot, chatbot, queue=False, api_name=False)
            answers.append(trimmed.then(self.reply, [chatbot, *settings], chatbot, api_name=False, **common))
            # for API clients: chat(message, history, ...) -> the history with the reply, streamed
            answers.append(gr.Button(visible=False).click(self.respond, [msg, chatbot, *settings], chatbot,
                                                          api_name="chat", **common))
            stop.click(None, None, None, cancels=answers)
            clear.click(lambda: ([], ""), None, [chatbot, msg], api_name="clear", queue=False, cancels=answers)
            loaded = load.click(self.load_model, [path, quant, ram], [load_status, header], api_name="load_model",
                                concurrency_id="generate", concurrency_limit=1)
            loaded.then(self.token_limit, max_tokens, max_tokens, api_name=False, show_progress="hidden",
                        queue=False)
            loaded.then(self.mode_fields, None, [msg, system], api_name=False, show_progress="hidden", queue=False)
            page.unload(self.tab_closed)
            page.load(self.live, None, [header, stats_box, heat_box], api_name=False, show_progress="hidden",
                      concurrency_limit=None)
            page.load(self.token_limit, max_tokens, max_tokens, api_name=False, show_progress="hidden", queue=False)
            page.load(self.mode_fields, None, [msg, system], api_name=False, show_progress="hidden", queue=False)
            timer = gr.Timer(REFRESH_SECONDS)
            timer.tick(self.live, None, [header, stats_box, heat_box], api_name="live", show_progress="hidden",
                       concurrency_limit=None)
        return page

    def launch(self, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               quiet: bool = True) -> tuple[gr.Blocks, str]:
        """Serve the page in background threads; returns (the Blocks, its local URL). page.close() stops it."""
        page = self.build()
        page.queue(default_concurrency_limit=1)
        port = port if port is not None else free_port(host)
        page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=quiet,
                    show_error=False, theme=THEME, css=CSS, footer_links=[], run_history=False, ssr_mode=False)
        return page, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"


class ModelThread:
    """One thread that makes every call into the model (loading, each next token). The kernels' OpenMP
    threads belong to the thread that calls them: calls from the server's changing worker threads would
    start one team per caller, and on a small machine the idle teams' spinning slows decoding severalfold."""

    def __init__(self):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="edgerun-model", daemon=True).start()

    def _serve(self) -> None:
        while True:
            future, context, fn, args = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(context.run(fn, *args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)

    def call(self, fn, *args):
        """fn(*args) on the model thread, in the caller's context (gradio's progress tracking follows it)."""
        future: Future = Future()
        self._calls.put((future, contextvars.copy_context(), fn, args))
        return future.result()


_model_thread: ModelThread | None = None
_model_thread_lock = threading.Lock()
_END = object()


def model_thread() -> ModelThread:
    global _model_thread
    with _model_thread_lock:
        if _model_thread is None:
            _model_thread = ModelThread()
        return _model_thread


def on_model_thread(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces of a reply, each computed on the model thread; closing this closes them there too."""
    thread = model_thread()
    try:
        while (piece := thread.call(next, pieces, _END)) is not _END:
            yield piece
    finally:
        thread.call(pieces.close)


def open_model(path: str, quant: str, ram: str, **options) -> edgerun.Model:
    """edgerun.load with the page's fields and `options`: an empty path is the demo model, "none" runs the model as
    it is."""
    if path:
        target = Path(path).expanduser()
        source = str(target) if target.exists() else path  # else a repo id in the HF cache
    else:
        from edgerun.demo_model import demo_model_dir

        source = demo_model_dir()
    return edgerun.load(source, quant=None if quant in ("", "none", None) else quant, ram=ram or None,
                        progress=True, **options)


def free_port(host: str = "127.0.0.1", start: int = DEFAULT_PORT, tries: int = 100) -> int:
    """The first port from start on that host can listen on."""
    for port in range(start, start + tries):
        if port_is_free(host, port):
            return port
    raise edgerun.EdgerunError(f"no free port between {start} and {start + tries - 1}: give one with --port")


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: old connections do not count
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _seed(value) -> int | None:
    """The seed field: a negative or empty one draws a new seed for every reply."""
    if value in (None, ""):
        return None
    seed = int(value)
    return seed if seed >= 0 else None


def _status(text: str, error: bool = False) -> str:
    return f"<span class='er-error'>{text}</span>" if error else text


THEME = gr.themes.Soft(
    primary_hue="orange", secondary_hue="teal", neutral_hue="slate",
    font=["Inter", "ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["JetBrains Mono", "ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
).set(
    block_label_background_fill="transparent", block_label_background_fill_dark="transparent",
    block_label_text_color="*neutral_600", block_label_text_color_dark="*neutral_300",
    block_title_text_color="*neutral_700", block_title_text_color_dark="*neutral_200",
    block_label_text_size="*text_sm", block_label_padding="0 0 *spacing_xs 0",
)

CSS = """
#er-header { align-items: center; gap: 16px; padding: 4px 4px 0; flex-wrap: nowrap; }
#er-brand { flex: 0 0 auto; width: auto; }
.er-brand { font-size: 1.35rem; font-weight: 700; letter-spacing: -0.02em; white-space: nowrap; }
.er-brand span { color: var(--color-accent); font-weight: 600; }
.er-model { display: flex; flex-wrap: wrap; gap: 6px 8px; align-items: center; font-size: 0.85rem; }
.er-model span { padding: 2px 8px; border-radius: 999px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); color: var(--body-text-color-subdued); }
.er-error { color: var(--error-text-color, #dc2626); }
.er-model span.er-mode { color: var(--body-text-color); border-color: #14b8a6; }
.er-model span.er-mode.er-completion { border-color: #f97316; }
.er-empty { text-align: center; color: var(--body-text-color-subdued); line-height: 1.6; }
#er-input-row { align-items: stretch; }
#er-stop { color: #dc2626; border: 1px solid #fca5a5; background: transparent; }
#er-stop:hover { background: rgba(220, 38, 38, 0.08); }
#er-actions { justify-content: flex-start; }
#er-actions button { flex: 0 0 auto; min-width: 110px; }
.er-live { display: flex; flex-direction: column; gap: 12px; }
.er-status { font-size: 0.9rem; color: var(--body-text-color-subdued); display: flex; align-items: center; gap: 8px; }
.er-dot { width: 9px; height: 9px; border-radius: 50%; background: #94a3b8; display: inline-block; }
.er-dot.er-busy { background: #22c55e; box-shadow: 0 0 0 0 rgba(34,197,94,.6); animation: er-pulse 1.2s infinite; }
@keyframes er-pulse { 0% { box-shadow: 0 0 0 0 rgba(34,197,94,.6); } 100% { box-shadow: 0 0 0 8px rgba(34,197,94,0); } }
.er-cards { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 8px; }
.er-card { padding: 10px 12px; border-radius: 10px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); }
.er-label { font-size: 0.7rem; text-transform: uppercase; letter-spacing: 0.06em;
  color: var(--body-text-color-subdued); }
.er-value { font-size: 1.45rem; font-weight: 650; font-variant-numeric: tabular-nums; line-height: 1.3; }
.er-unit { font-size: 0.8rem; font-weight: 500; margin-left: 4px; color: var(--body-text-color-subdued); }
.er-note { font-size: 0.75rem; color: var(--body-text-color-subdued); }
.er-mem { padding: 10px 12px; border-radius: 10px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); display: flex; flex-direction: column; gap: 6px; }
.er-mem-title, .er-heat-title { font-size: 0.85rem; font-weight: 600; }
.er-bar { position: relative; display: flex; height: 16px; border-radius: 6px; overflow: hidden;
  background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.er-seg { height: 100%; }
.er-peak { position: absolute; top: -2px; bottom: -2px; width: 2px; background: var(--body-text-color); }
.er-legend { display: flex; flex-wrap: wrap; gap: 4px 12px; font-size: 0.75rem; color: var(--body-text-color-subdued); }
.er-key { display: inline-flex; align-items: center; gap: 5px; }
.er-key i { width: 11px; height: 11px; border-radius: 3px; display: inline-block; }
.er-t0 { background: #94a3b8; } .er-t1 { background: #6366f1; } .er-t2 { background: #0ea5e9; }
.er-t3 { background: #a855f7; } .er-t4 { background: #f97316; }
.er-heatwrap { padding: 10px 12px; border-radius: 10px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); display: flex; flex-direction: column; gap: 8px; }
.er-heat { display: grid; gap: 3px; align-items: center; }
.er-hl, .er-hx { font-size: 0.65rem; color: var(--body-text-color-subdued); text-align: center;
  font-variant-numeric: tabular-nums; }
.er-c { height: 18px; border-radius: 4px; box-sizing: border-box; }
.er-heat.er-small { gap: 2px; } .er-heat.er-small .er-c { height: 9px; border-radius: 2px; }
.er-used { background: rgba(249, 115, 22, calc(0.18 + 0.82 * var(--u))); }
.er-ram { border: 2px solid #14b8a6; }
.er-gpu { border: 3px solid #a855f7; }
.er-disk { border: 1px dashed #94a3b8; }
.er-loading { border: 2px solid #3b82f6; animation: er-blink 0.8s infinite alternate; }
@keyframes er-blink { from { border-color: #3b82f6; } to { border-color: transparent; } }
.er-sw { border-radius: 3px; box-sizing: border-box; }
.er-sw.er-loading { animation: none; }
.er-heat-empty { color: var(--body-text-color-subdued); }
"""
