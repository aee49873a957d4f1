"""`edgerun trace replay FILE`: the hit rate an expert cache policy reaches on a recorded routing
trace, next to Belady's offline optimum for the same number of expert slots; with --skip-below or
--substitute-below, the experts approximate decoding would read per token (its light misses left out or
replaced by the rule of `edgerun run`'s options), against the same cache decoding exactly."""

from __future__ import annotations

import argparse
import json

from . import int_range


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_parser(sub) -> None:
    from ..runtime.policy import POLICIES
    from .run import layer_weights

    p = sub.add_parser("trace", help="work with routing traces (expert choices per token and layer)",
                       description="Work with routing traces: JSON lines of the experts each layer picked per token.")
    actions = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)
    r = actions.add_parser("replay", help="replay a trace against an expert cache", description=__doc__)
    r.add_argument("file", metavar="FILE.jsonl", help="routing trace (JSON lines)")
    size = r.add_mutually_exclusive_group(required=True)
    size.add_argument("--capacity", type=int_range(1), metavar="N", help="expert slots in the cache")
    size.add_argument("--capacity-frac", type=_fraction, metavar="F",
                      help="expert slots as a fraction of all the trace's experts (0 < F <= 1)")
    r.add_argument("--policy", default="default", choices=POLICIES, help="eviction policy (default: default)")
    r.add_argument("--skip-below", type=layer_weights, default=0.0, metavar="W",
                   help="leave out an expert that misses and weighs less than W (one weight, or one per layer as "
                        "for `edgerun run`)")
    r.add_argument("--substitute-below", type=layer_weights, default=0.0, metavar="W",
                   help="replace an expert that misses and weighs less than W (not below --skip-below) by one of its "
                        "layer in the cache, or read it if the layer has none there")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    from ..runtime.trace import belady, capacity_from_fraction, read_trace, replay

    trace = read_trace(args.file)
    total = trace.num_layers * trace.num_experts
    capacity = args.capacity if args.capacity is not None else capacity_from_fraction(args.capacity_frac, total)
    result = replay(trace, capacity, args.policy)
    result.update(belady_hit_rate=belady(trace, capacity), capacity=capacity, policy=args.policy,
                  num_layers=trace.num_layers, num_experts=trace.num_experts)
    if any(any(t) if isinstance(t, list) else t for t in (args.skip_below, args.substitute_below)):
        result["approximate"] = dict(replay(trace, capacity, args.policy, skip_below=args.skip_below,
                                            substitute_below=args.substitute_below),
                                     skip_below=args.skip_below, substitute_below=args.substitute_below)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"policy {args.policy}: {100 * result['hit_rate']:.1f}% hits ({result['hits']} of {result['accesses']} "
          f"accesses), capacity {capacity} of {total} experts; Belady optimum {100 * result['belady_hit_rate']:.1f}%")
    if "approximate" in result:
        a, exact = result["approximate"], result["reads_per_token"]
        reads = a["reads_per_token"]
        print(f"approximate: {reads:.1f} experts read per token against {exact:.1f} exactly"
              f"{f' ({exact / reads:.2f}x fewer)' if reads else ''}; {a['left_out_per_token']:.1f} left out, "
              f"{a['replaced_per_token']:.1f} replaced, {a['light_reads_per_token']:.1f} light misses read (no expert "
              f"of their layer in the cache to stand in)")
    return 0
