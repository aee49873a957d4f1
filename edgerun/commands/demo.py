"""`edgerun demo`: run the embedded default model end to end, with no download."""

from __future__ import annotations

import argparse
import sys

from .run import add_generation_args, read_prompt, stream_answer

DEFAULT_PROMPT = "Once upon a time, in a land far away,"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the embedded demo model (no download)", description=__doc__)
    add_generation_args(p, default_n=64)
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    import edgerun
    from ..demo_model import CONFIG, demo_model_dir

    print("edgerun demo: a small Mixtral-architecture model (8 experts, top-2, "
          f"{CONFIG['num_hidden_layers']} layers) with RANDOM weights and the real Mixtral tokenizer.\n"
          "Its text is meaningless: it shows the runtime working end to end, not a trained model.",
          file=sys.stderr)
    model = edgerun.load(demo_model_dir())
    prompt = read_prompt(args, default=DEFAULT_PROMPT)
    if args.temp is None:
        args.temp = 0.8  # random weights are most telling sampled; greedy repeats one token
    print(f"model: {model.path}\nprompt: {prompt}", file=sys.stderr)
    stream_answer(model, prompt, args)
    return 0
