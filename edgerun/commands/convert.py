"""`edgerun convert SRC DST`: turn a checkpoint into a quantized expert store. SRC: a Hugging Face model directory
or repo id in the local HF cache, or Grok-1 as xai-org released it (the folder holding ckpt-0/, or ckpt-0/)."""

from __future__ import annotations

import argparse
import resource
import sys
import time

from ..units import format_size


def add_parser(sub) -> None:
    from ..store.convert import DENSE_CHOICES, QUANT_CHOICES

    p = sub.add_parser("convert", help="convert a checkpoint into an expert store", description=__doc__)
    p.add_argument("src", metavar="SRC",
                   help="HF model directory, repo id in the local HF cache, or Grok-1's release folder (ckpt-0/)")
    p.add_argument("dst", metavar="DST", help="the store directory to create")
    p.add_argument("--quant", default="q4", choices=QUANT_CHOICES,
                   help="expert format: q4 (default), q8, bf16, or none (the checkpoint's own precision)")
    p.add_argument("--dense", default=None, choices=DENSE_CHOICES,
                   help="format of the other matrices (default: q8 with q4/q8, else as --quant)")
    p.add_argument("--group", type=int, default=32, help="quantization group size (a multiple of 32)")
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    from ..checkpoint.source import locate
    from ..store.convert import convert
    from ..store.store import ExpertStore

    t0 = time.perf_counter()
    dst = convert(args.src, args.dst, quant=args.quant, dense=args.dense, group=args.group, progress=None)
    seconds = time.perf_counter() - t0
    store = ExpertStore(dst)
    read = locate(args.src).nbytes
    written = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"{dst}: experts {store.expert_layout.fmt}, other matrices {store.quant['dense']}; "
          f"read {format_size(read)}, wrote {format_size(written)} in {seconds:.1f} s "
          f"({read / 1e6 / seconds:.0f} MB/s of checkpoint), peak RSS {format_size(rss)}", file=sys.stderr)
    return 0
