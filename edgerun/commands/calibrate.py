"""`edgerun calibrate STORE --ram SIZE --text FILE`: measure, on text of your own, which MoE layers can spare their
light experts when they miss, and print the per-layer `--substitute-below` that reads the fewest bytes per token
within a perplexity budget (default 1%) under that RAM budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ArgumentError
from ..units import format_size
from . import int_range
from .run import layer_weights_text


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r}") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100 (percent), got {text}")
    return value / 100


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="per-layer thresholds of approximate decoding, measured on your text",
                       description=__doc__)
    p.add_argument("model", metavar="STORE", help="a q8/q4 store (edgerun convert), or a checkpoint with --quant")
    p.add_argument("--ram", required=True, metavar="SIZE",
                   help="the memory budget you will run with, e.g. 12GiB: it decides which experts miss")
    p.add_argument("--text", required=True, metavar="FILE", help="plain text like what you will run (UTF-8)")
    p.add_argument("--tokens", type=int_range(2), default=2048, metavar="N",
                   help="tokens of the text scored per setting (default 2048; about 25 settings are scored)")
    p.add_argument("--max-loss", type=_percent, default=0.01, metavar="PCT",
                   help="perplexity allowed above exact decoding, in percent (default 1)")
    p.add_argument("--groups", type=int_range(1, 8, " groups of layers"), default=4, metavar="G",
                   help="runs of consecutive MoE layers given one threshold each (default 4, at most 8)")
    p.add_argument("--quant", default=None, choices=["q8", "q4"], help="convert a checkpoint first (cached)")
    p.add_argument("--ctx", type=int_range(2), default=512, metavar="N", help="tokens per scored window (default 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    import edgerun

    from ..calibrate import calibrate

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArgumentError(f"cannot read the text {args.text}: {e}") from None
    model = edgerun.load(args.model, quant=args.quant, ram=args.ram, context_length=args.ctx, gpu=0)
    ids = model.tokenizer.encode(text, add_special_tokens=False)[:args.tokens]
    if len(ids) < args.tokens:
        print(f"note: the text has {len(ids)} tokens, fewer than --tokens {args.tokens}", file=sys.stderr)
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    experts = model.experts
    if log and hasattr(experts, "capacity"):
        log(f"{experts.capacity} of {len(experts.layers) * experts.store.num_experts} experts in RAM under this "
            f"budget; scoring {len(ids)} tokens per setting")
    c = calibrate(model, ids, max_loss=args.max_loss, groups=args.groups, bos=model.spec.bos_token_id, log=log)
    flag = layer_weights_text(c.thresholds)
    if args.json:
        print(json.dumps({"substitute_below": c.thresholds, "flag": f"--substitute-below {flag}",
                          "groups": c.groups, "max_loss": c.max_loss, "loss": c.loss,
                          "exact": c.exact.summary(), "calibrated": c.calibrated.summary(), "trials": c.trials},
                         indent=2))
        return 0
    if not any(c.thresholds):
        print(f"no threshold keeps perplexity within {c.max_loss:.1%} of exact decoding on this text: decode "
              f"exactly (or allow more with --max-loss)")
        return 0
    saved = 1 - c.calibrated.bytes_per_token / c.exact.bytes_per_token
    print(f"--substitute-below {flag}")
    print(f"on {c.exact.tokens} tokens: perplexity {c.calibrated.perplexity:.3f} against {c.exact.perplexity:.3f} "
          f"exact ({c.loss:+.2%}), {saved:.0%} fewer bytes read per token "
          f"({format_size(c.calibrated.bytes_per_token)} against {format_size(c.exact.bytes_per_token)}), "
          f"{c.calibrated.substituted_rate:.1%} of the decoded experts replaced")
    return 0
