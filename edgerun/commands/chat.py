"""`edgerun chat [MODEL]`: a local web page to chat with a model and watch its experts stream in and out of RAM."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import sys
import time

from ..errors import EdgerunError
from .run import add_approximate_args, add_gpu_args, any_weight, approximate_kwargs, gpu_kwargs, note_exact
from .serve import LOOPBACK


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in a local web page", description=__doc__)
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model directory, repo id in the local HF cache, Grok-1's release (ckpt-0/), or store "
                        "(default: the demo model)")
    p.add_argument("--quant", default=None, choices=["none", "q8", "q4", "mxfp4"],
                   help="convert a checkpoint first (cached), as edgerun.load(..., quant=) does")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="memory budget of the whole process, e.g. 12GiB (default: what the machine has)")
    add_gpu_args(p)
    add_approximate_args(p)
    p.add_argument("--port", type=int, default=None, metavar="N",
                   help="port to serve on (default: the first free one from 7860)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)")
    p.add_argument("--share", default="no", choices=["no", "yes"],
                   help="also open a public gradio.live link (default no)")
    p.add_argument("--ctx", type=int, default=None, metavar="N", help="context length (default: model's, max 4096)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: edgerun.load's pick)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="chat with the model of a running `edgerun serve` (e.g. http://127.0.0.1:8000) instead of "
                        "loading one here")
    p.add_argument("--api-key", default=None, metavar="KEY", help="the server's --api-key")
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    if args.port is not None and not 1 <= args.port <= 65535:
        raise EdgerunError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        from ..apps import chat
    except ImportError as e:
        raise EdgerunError(f"the chat app needs gradio ({e}): pip install gradio") from None
    if args.port is not None and not chat.port_is_free(args.host, args.port):
        raise EdgerunError(f"cannot listen on {args.host}:{args.port}: the port is in use or the address is not "
                           "this machine's; pick another with --port")
    import edgerun

    if args.server:
        if args.model or args.quant or args.ram or any(map(any_weight, approximate_kwargs(args).values())):
            raise EdgerunError("--server chats with the server's model: leave out MODEL, --quant, --ram and the "
                               "options of approximate decoding (give those to `edgerun serve`)")
        from ..remote import RemoteModel

        remote = RemoteModel(args.server, api_key=args.api_key)  # an unreachable server fails before the page opens
        app = chat.ChatApp(remote, (args.server, "none", ""), {})
        try:
            page, url = app.launch(host=args.host, port=args.port, share=args.share == "yes")
        except OSError as e:
            raise EdgerunError(f"cannot serve the page on {args.host}: {e}") from None
        print(f"edgerun chat: chatting with {remote.name} at {remote.url}; page at {url}", flush=True)
        return _serve_page(page, args)
    if args.model:
        source = args.model
    else:
        from ..demo_model import demo_model_dir

        source = demo_model_dir()
    quant = None if args.quant in (None, "none") else args.quant
    options = {"context_length": args.ctx, "threads": args.threads, **approximate_kwargs(args), **gpu_kwargs(args),
               "reserve": chat.SERVER_RESERVE}
    app = chat.ChatApp(None, (args.model or "", args.quant or "none", args.ram or ""), options)
    try:
        page, url = app.launch(host=args.host, port=args.port, share=args.share == "yes")
    except OSError as e:
        raise EdgerunError(f"cannot serve the page on {args.host}: {e}") from None
    try:  # the server runs first, so that a RAM budget, planned when the model loads, counts its memory too
        print(f"edgerun chat: loading {source}", file=sys.stderr)
        app.model = chat.model_thread().call(functools.partial(edgerun.load, source, quant=quant, ram=args.ram,
                                                               **options))
    except BaseException:
        _close(page)
        raise
    note_exact(app.model)
    print(f"edgerun chat: serving {app.model.path} at {url}", flush=True)
    return _serve_page(page, args)


def _serve_page(page, args: argparse.Namespace) -> int:
    if args.host not in LOOPBACK:
        print(f"edgerun chat: listening on {args.host}: other machines of the network can open it", file=sys.stderr)
    if getattr(page, "share_url", None):
        print(f"edgerun chat: public link {page.share_url}", flush=True)
    print("edgerun chat: press Ctrl+C to stop", file=sys.stderr, flush=True)
    try:
        while page.is_running:  # Ctrl+C ends here as KeyboardInterrupt
            time.sleep(0.2)
    finally:
        _close(page)
    return 0


def _close(page) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # gradio announces it on stdout
        page.close()
