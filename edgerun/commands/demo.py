"""`edgerun demo`: chat with the embedded demo model, a small MoE trained on Tiny Shakespeare (no download).
Your prompt is spoken by ROMEO and the model answers as JULIET, in the play's own format."""

from __future__ import annotations

import argparse
import sys

from .run import add_generation_args, read_prompt, stream_answer

DEFAULT_PROMPT = "Good morrow, fair Juliet. What news from Verona?"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="chat with the embedded demo model (no download)", description=__doc__)
    add_generation_args(p, default_n=128)
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    import edgerun
    from ..demo_model import demo_model_dir, describe

    path = demo_model_dir()
    print(f"edgerun demo: {describe(path)}.", file=sys.stderr)
    model = edgerun.load(path)
    prompt = read_prompt(args, default=DEFAULT_PROMPT)
    args.chat = True  # the model is trained on dialogue: the prompt is always a speech
    print(f"model: {model.path}\nprompt: {prompt}", file=sys.stderr)
    stream_answer(model, prompt, args)
    return 0
