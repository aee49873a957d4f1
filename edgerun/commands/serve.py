"""`edgerun serve [MODEL]`: an OpenAI-compatible HTTP API for one model (chat and text completions, streamed or
not; /v1/models, /health, /metrics), for the `openai` client, editors, agents and chat front-ends."""

from __future__ import annotations

import argparse
import sys

from ..errors import EdgerunError
from .run import add_approximate_args, add_gpu_args, approximate_kwargs, gpu_kwargs, note_exact

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model directory, repo id in the local HF cache, Grok-1's release (ckpt-0/), or store "
                        "(default: the demo model)")
    p.add_argument("--quant", default=None, choices=["none", "bf16", "q8", "q4", "mxfp4"],
                   help="convert a checkpoint first (cached), as edgerun.load(..., quant=) does")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="memory budget of the whole process, e.g. 12GiB (default: what the machine has)")
    add_gpu_args(p)
    add_approximate_args(p)
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the model directory's name)")
    p.add_argument("--ctx", type=int, default=None, metavar="N", help="context length (default: model's, max 4096)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: edgerun.load's pick)")
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    import socket

    if not 1 <= args.port <= 65535:
        raise EdgerunError(f"--port must be between 1 and 65535, got {args.port}")
    try:  # a taken port fails before the model loads, not minutes later
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise EdgerunError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pick another with "
                           f"--port") from None
    import uvicorn

    import edgerun

    from ..serve import create_app

    if args.model:
        source = args.model
    else:
        from ..demo_model import demo_model_dir

        source = demo_model_dir()
    quant = None if args.quant in (None, "none") else args.quant
    print(f"edgerun serve: loading {source}", file=sys.stderr)
    model = edgerun.load(source, quant=quant, ram=args.ram, context_length=args.ctx, threads=args.threads,
                         **approximate_kwargs(args), **gpu_kwargs(args))
    note_exact(model)
    name = args.model_name or model.path.name
    if args.host not in LOOPBACK and not args.api_key:
        print(f"edgerun serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              f"machine can use the model", file=sys.stderr)
    print(f"edgerun serve: {name} at http://{args.host}:{args.port}/v1 (Ctrl+C to stop)", file=sys.stderr,
          flush=True)
    uvicorn.run(create_app(model, name, api_key=args.api_key), host=args.host, port=args.port, log_level="warning")
    return 0
