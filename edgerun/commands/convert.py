"""`edgerun convert SRC DST`: turn a checkpoint into a quantized expert store. SRC: a Hugging Face model directory
or repo id in the local HF cache, or Grok-1 as xai-org released it (the folder holding ckpt-0/, or ckpt-0/).
`edgerun convert STORE --low-bits q2`: add 2-bit (or q3: 3-bit) copies of a q4 store's experts, which decoding
reads instead of a light expert that is not in RAM (`--low-below`)."""

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
    p.add_argument("dst", metavar="DST", nargs="?", help="the store directory to create (none when SRC is a store)")
    p.add_argument("--quant", default="q4", choices=QUANT_CHOICES,
                   help="expert format: q4 (default), q8, mxfp4 (gpt-oss's own 4.25-bit format), bf16, or none "
                        "(the checkpoint's own precision)")
    p.add_argument("--dense", default=None, choices=DENSE_CHOICES,
                   help="format of the other matrices (default: q8 with q4/q8/mxfp4, else as --quant)")
    p.add_argument("--group", type=int, default=32, help="quantization group size (a multiple of 32)")
    p.add_argument("--low-bits", choices=("q2", "q3"), default=None,
                   help="also write low-bit copies of the q4 experts (about 0.55x / 0.78x of their bytes), read by "
                        "--low-below; SRC may be a store made before")
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    from ..checkpoint.source import locate
    from ..errors import ArgumentError
    from ..store.convert import convert
    from ..store.store import ExpertStore, is_store

    t0 = time.perf_counter()
    if is_store(args.src):
        if not args.low_bits or args.dst:
            raise ArgumentError(f"{args.src} is already a store: `edgerun convert {args.src} --low-bits q2` adds "
                                f"low-bit copies of its experts; to convert again, give the checkpoint")
        return _add_low(args.src, args.low_bits, t0)
    if not args.dst:
        raise ArgumentError("give the store directory to create (DST)")
    if args.low_bits and args.quant != "q4":
        raise ArgumentError(f"--low-bits copies q4 experts; this conversion's are {args.quant}")
    dst = convert(args.src, args.dst, quant=args.quant, dense=args.dense, group=args.group, progress=None)
    if args.low_bits:
        _add_low(dst, args.low_bits, time.perf_counter())
    seconds = time.perf_counter() - t0
    store = ExpertStore(dst)
    read = locate(args.src).nbytes
    written = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(f"{dst}: experts {store.expert_layout.fmt}, other matrices {store.quant['dense']}; "
          f"read {format_size(read)}, wrote {format_size(written)} in {seconds:.1f} s "
          f"({read / 1e6 / seconds:.0f} MB/s of checkpoint), peak RSS {format_size(rss)}", file=sys.stderr)
    return 0


def _add_low(path, fmt: str, t0: float) -> int:
    from ..store.lowbit import add_low_copies
    from ..store.store import ExpertStore

    add_low_copies(path, fmt, progress=None)
    store = ExpertStore(path)
    low = store.low_layout
    print(f"{path}: {fmt} copies of {len(store.moe_layers) * store.num_experts} experts, "
          f"{format_size(low.nbytes)} each against {format_size(store.chunk_bytes)} "
          f"({low.nbytes / store.chunk_bytes:.2f}x) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
