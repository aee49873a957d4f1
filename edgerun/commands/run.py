"""`edgerun run MODEL -p PROMPT`: stream a completion (or a chat reply with --chat) and report tokens/s."""

from __future__ import annotations

import argparse
import sys

from ..errors import EdgerunError
from ..units import format_size


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text from a prompt", description=__doc__)
    p.add_argument("model", metavar="MODEL",
                   help="HF model directory, repo id in the local HF cache, Grok-1's release (ckpt-0/), or store")
    add_generation_args(p)
    p.add_argument("--quant", default=None, choices=["none", "bf16", "q8", "q4", "mxfp4"],
                   help="convert a checkpoint first (cached), as edgerun.load(..., quant=) does")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="memory budget of the whole process, e.g. 12GiB (default: what the machine has)")
    add_gpu_args(p)
    add_approximate_args(p)
    p.add_argument("--policy", default="default", choices=["default", "lru", "lfu"], help="expert cache policy")
    p.add_argument("--trace-out", default=None, metavar="FILE.jsonl",
                   help="record the experts every token used, for `edgerun trace replay`")
    p.add_argument("--ctx", type=int, default=None, metavar="N", help="context length (default: model's, max 4096)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: edgerun.load's pick)")
    p.set_defaults(main=main)


def add_gpu_args(p: argparse.ArgumentParser) -> None:
    """--gpu, --device and --misses: the GPU tier of a q8/q4 store, as edgerun.load(gpu=, device=, misses=)."""
    p.add_argument("--gpu", default=None, metavar="SIZE",
                   help="GPU memory to use, e.g. 6GB (default: the CUDA GPU's free memory less a margin; 0: none)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (the first CUDA GPU), cuda:N, mps, or cpu (the CPU standing in for a GPU, for "
                        "comparisons; needs --gpu)")
    p.add_argument("--misses", default="auto", choices=["auto", "copy", "cpu"],
                   help="where experts missing from the GPU run: auto (where the profile says they cost least), "
                        "copy (over to the GPU), cpu")


def layer_weights(text: str) -> float | list[float]:
    """A routing weight for every MoE layer ("0.3"), or one per MoE layer, comma-separated, where "WxN" stands
    for N layers in a row at W ("0x8,0.5x24")."""
    values = []
    try:
        for part in text.split(","):
            weight, _, count = part.strip().partition("x")
            if count and int(count) < 1:
                raise ValueError
            values += [float(weight)] * (int(count) if count else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a weight nor a comma-separated list of weights (one per "
                                         f"MoE layer, WxN for N layers at W)") from None
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: routing weights go from 0 up to 1 (0: exact)")
    return values[0] if len(values) == 1 else values


def layer_weights_text(values: float | list[float]) -> str:
    """Weights as --substitute-below takes them: one, or one per layer with runs of equal ones as WxN."""
    if isinstance(values, (int, float)):
        return f"{values:g}"
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ",".join(f"{v:g}" + (f"x{n}" if n > 1 else "") for v, n in runs)


def add_approximate_args(p: argparse.ArgumentParser) -> None:
    per_layer = " W is one weight, or one per MoE layer: 0.2,0.5,0.5 or 0x8,0.5x24 (N layers at W)."
    p.add_argument("--skip-below", type=layer_weights, default=0.0, metavar="W",
                   help="approximate decoding under --ram: leave out a token's expert that is not in RAM and whose "
                        "routing weight is below W, instead of reading it (default 0: exact)." + per_layer)
    p.add_argument("--substitute-below", type=layer_weights, default=0.0, metavar="W",
                   help="approximate decoding under --ram: compute, in place of a token's expert that is not in RAM "
                        "and whose routing weight is below W (and not below --skip-below, which leaves it out), the "
                        "most probable expert of its layer that is in RAM (default 0: exact)." + per_layer)
    p.add_argument("--low-below", type=layer_weights, default=0.0, metavar="W",
                   help="approximate decoding under --ram: read a token's expert that is not in RAM and whose "
                        "routing weight is below W from its low-bit copy (`edgerun convert STORE --low-bits q2`) "
                        "(default 0: exact)." + per_layer)
    p.add_argument("--low-when-late", action="store_true",
                   help="approximate decoding under --ram: also read a token's expert from its low-bit copy, "
                        "whatever its weight, when the read-ahead did not bring it in time (the disk is behind)")


def approximate_kwargs(args: argparse.Namespace) -> dict:
    return {"skip_below": args.skip_below, "substitute_below": args.substitute_below, "low_below": args.low_below,
            "low_when_late": args.low_when_late}


def note_exact(model) -> None:
    """One line on stderr for each reason that options of approximate decoding given change nothing."""
    reasons: dict[str, list[str]] = {}
    for name, why in model.stats().get("runtime_settings", {}).get("approximate_inactive", {}).items():
        reasons.setdefault(why, []).append("--" + name.replace("_", "-"))
    for why, flags in reasons.items():
        listed = ", ".join(flags[:-1]) + " and " + flags[-1] if len(flags) > 1 else flags[0]
        print(f"edgerun: note: {why}, so {listed} change{'s' if len(flags) == 1 else ''} nothing", file=sys.stderr)


def any_weight(value: float | bool | list[float]) -> bool:
    """Whether an option of approximate decoding is on (a threshold above 0 for some layer, or a flag)."""
    return any(value) if isinstance(value, (list, tuple)) else bool(value)


def gpu_kwargs(args: argparse.Namespace) -> dict:
    return {"gpu": args.gpu, "device": args.device, "misses": args.misses}


def add_generation_args(p: argparse.ArgumentParser, default_n: int = 256) -> None:
    p.add_argument("-p", "--prompt", help="the prompt ('-' or omitted with piped input: read stdin)")
    p.add_argument("-n", "--max-tokens", type=int, default=default_n, metavar="N",
                   help=f"most tokens to generate (default {default_n})")
    p.add_argument("--chat", action="store_true",
                   help="treat the prompt as a user message in the chat template (a model without one continues "
                        "the prompt as written)")
    p.add_argument("--system", metavar="TEXT", help="system prompt (with --chat)")
    p.add_argument("--temp", type=float, default=None, metavar="T", help="temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=None, metavar="P")
    p.add_argument("--top-k", type=int, default=None, metavar="K")
    p.add_argument("--min-p", type=float, default=None, metavar="P")
    p.add_argument("--repeat-penalty", type=float, default=None, metavar="R")
    p.add_argument("--seed", type=int, default=None, metavar="S")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def read_prompt(args: argparse.Namespace, default: str | None = None) -> str:
    """-p TEXT; '-' reads stdin, as does an omitted -p with piped input when there is no default."""
    prompt = args.prompt
    if prompt == "-" or (prompt is None and default is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
    prompt = prompt or default
    if not prompt:
        raise EdgerunError("no prompt: give one with -p TEXT (or pipe it on stdin with -p -)")
    return prompt


def stream_answer(model, prompt: str, args: argparse.Namespace) -> None:
    """Print the answer as it is generated, then one line of figures on stderr."""
    kwargs = dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                  repetition_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)
    chat = args.chat
    if chat and not model.tokenizer.has_chat_template:  # a base model: it can only continue the text
        if args.system:
            raise EdgerunError("this model has no chat template, so --system has no place in its prompt: "
                               "write the instructions into the prompt and leave out --chat")
        print("edgerun: this model has no chat template: --chat is ignored and the prompt is continued as written",
              file=sys.stderr)
        chat = False
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        pieces = model.stream_chat(messages + [{"role": "user", "content": prompt}], args.max_tokens, **kwargs)
    else:
        if args.system:
            raise EdgerunError("--system needs --chat")
        pieces = model.stream(prompt, args.max_tokens, **kwargs)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(format_stats(model.stats()), file=sys.stderr)


def format_stats(s: dict) -> str:
    prefilled = s["prompt_tokens"] - s["cached_prompt_tokens"]
    return (f"[{s['generated_tokens']} tokens, {s['finish_reason']} | prefill {prefilled} tokens at "
            f"{s['prefill_tokens_per_s']:.1f} tok/s | decode {s['decode_tokens_per_s']:.1f} tok/s | "
            f"first token {s['time_to_first_token_s'] * 1000:.0f} ms"
            + (f" | expert hits {100 * s['hit_rate']:.0f}%, read {format_size(s['bytes_read'])}"
               if s["offload"] else "")
            + (f", disk busy {100 * s['read_busy_share']:.0f}% of decode" if "read_busy_share" in s else "")
            + (f", {100 * s['skipped_rate']:.0f}% left out" if s.get("skip_below") else "")
            + (f", {100 * s['substituted_rate']:.0f}% substituted" if s.get("substitute_below") else "")
            + (f", {100 * s['low_served_rate']:.0f}% from {s['low_format']} copies"
               if s.get("low_below") or s.get("low_when_late") else "")
            + (f" | {s['device']}: {100 * s['decode_gpu_expert_share']:.0f}% of decoded experts, "
               f"{format_size(s['h2d_bytes_per_token'])} copied per token" if "gpu_hit_rate" in s else "")
            + "]")


def main(args: argparse.Namespace) -> int:
    import edgerun

    prompt = read_prompt(args)
    model = edgerun.load(args.model, quant=args.quant, context_length=args.ctx, dtype=args.dtype,
                         threads=args.threads, ram=args.ram, policy=args.policy, **approximate_kwargs(args),
                         **gpu_kwargs(args))
    note_exact(model)
    if args.trace_out:
        with model.record_routing(args.trace_out):
            stream_answer(model, prompt, args)
    else:
        stream_answer(model, prompt, args)
    return 0
