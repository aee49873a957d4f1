"""`edgerun plan MODEL`: predict where a model's parts would live (RAM, GPU, disk) and how fast it would
prefill and decode on a profiled machine, from its config alone: nothing is downloaded, converted or loaded.
MODEL: an edgerun store, a model directory with config.json, Grok-1's release (ckpt-0/), or a config.json file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EdgerunError


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict memory placement and speed of a model on a hardware profile",
                       description=__doc__)
    p.add_argument("model", metavar="MODEL", help="edgerun store, model directory, Grok-1's release or config.json")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="hardware profile (default: this machine's, saved by `edgerun profile`; without one, a "
                        "quick profile is measured and saved, as edgerun.load does)")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="RAM budget, e.g. 12GiB (default: the profile's available RAM less 15%%)")
    p.add_argument("--gpu", default=None, metavar="SIZE",
                   help="GPU memory to use (default: the profile's GPU less the CUDA context and a margin; 0: none)")
    p.add_argument("--quant", choices=("q4", "q8", "mxfp4"), default="q4",
                   help="expert format (default q4; a store's own; mxfp4 is predicted at q4's kernel rates)")
    p.add_argument("--dense", choices=("q8", "q4", "bf16"), default="q8",
                   help="format of the other matrices (default q8; a store's own)")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context length (default: the model's, at most 4096)")
    p.add_argument("--prompt", type=int, default=512, metavar="N",
                   help="prompt length the prefill speed is predicted for (default 512)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")
    p.set_defaults(main=main)


def read_model(path: Path, quant: str, dense: str) -> tuple[dict, str, str, int]:
    """(config, expert format, dense format, group): a store's own formats, else the ones asked for."""
    from ..checkpoint.grok1_release import find_release, read_config
    from ..checkpoint.hf import read_json
    from ..store.store import ExpertStore, is_store

    if is_store(path):
        store = ExpertStore(path)
        if store.quant["experts"] not in ("q4", "q8", "mxfp4"):
            raise EdgerunError(f"{path} keeps its experts in {store.quant['experts']}, which run only fully "
                               f"resident; plan its checkpoint with --quant q4 or q8 instead")
        return store.config, store.quant["experts"], store.quant["dense"], store.quant["group"]
    release = find_release(path)
    if release is not None:
        return read_config(release[0]).hf_config(), quant, dense, 32
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise EdgerunError(f"{path} is not an edgerun store, a model directory or a config.json file")
    return read_json(path), quant, dense, 32


def read_profile(path: str | None) -> dict:
    """The profile at path; else this machine's saved one, or, without one, a quick one measured and saved now
    (as edgerun.load does), so that a first plan needs no `edgerun profile` beforehand."""
    from ..hw.profile import default_profile_path, load_profile, measure_profile, save_profile

    if path is not None:
        if not Path(path).exists():
            raise EdgerunError(f"--profile {path}: no such file (`edgerun profile --out FILE` writes one)")
        return load_profile(path)
    saved = default_profile_path()
    if saved.is_file():
        return load_profile(saved)
    print("edgerun plan: no hardware profile of this machine yet: measuring a quick one (edgerun profile --quick)...",
          file=sys.stderr, flush=True)
    profile = measure_profile(quick=True, log=lambda line: None)
    try:
        kept = f"saved to {save_profile(profile, saved)}"
    except EdgerunError as e:  # the plan goes on with it all the same
        kept = f"not saved: {e}"
    print(f"edgerun plan: measured a quick profile in {profile['duration_s']:.0f} s, {kept}; `edgerun profile` "
          "measures a full one", file=sys.stderr)
    return profile


def main(args: argparse.Namespace) -> int:
    from ..hw.plan import predict
    from ..units import parse_size

    if args.ctx is not None and args.ctx < 2:
        raise EdgerunError(f"--ctx must be at least 2, got {args.ctx}")
    if args.prompt < 1:
        raise EdgerunError(f"--prompt must be at least 1, got {args.prompt}")
    config, experts, dense, group = read_model(Path(args.model), args.quant, args.dense)
    profile = read_profile(args.profile)
    pred = predict(config, profile, expert_format=experts, dense_format=dense,
                   ram=parse_size(args.ram) if args.ram else None,
                   gpu=parse_size(args.gpu, zero=True) if args.gpu else None,
                   ctx=args.ctx, group=group, prompt=args.prompt)
    if args.json:
        print(json.dumps(pred.as_dict() | {"prompt_tokens": args.prompt}, indent=2))
    else:
        print(describe(pred, experts, dense, args.prompt))
    return 0 if pred.possible else 1


def describe(pred, experts: str, dense: str, prompt: int = 512) -> str:
    """The prediction as a few human lines."""
    from ..units import format_size

    if not pred.possible:
        return f"impossible: {pred.reason}"
    width = max(len(row["part"]) for row in pred.placement)
    lines = [f"plan for {experts} experts, {dense} dense weights, RAM budget {format_size(pred.ram_budget_bytes)}"]
    lines += [f"  {row['part']:<{width}}  {row['where']:<3}  {format_size(row['bytes']):>11}" for row in pred.placement]
    tiers = ", ".join(f"{tier} {format_size(n)}" for tier, n in pred.bytes_per_token.items())
    t = pred.times
    reads = "every expert in RAM" if pred.expert_slots >= pred.experts_total else (
        f"{pred.readers} reader{'s' * (pred.readers > 1)}, {pred.prefetch_depth} layer"
        f"{'s' * (pred.prefetch_depth > 1)} ahead")
    lines += [
        f"experts per token from {tiers} (hit rate {pred.hit_rate:.0%})",
        (f"per token: read {t['read'] * 1e3:.1f} ms ({reads}), "
         f"experts {t['experts'] * 1e3:.1f} ms, dense {t['dense'] * 1e3:.1f} ms, attention {t['kv'] * 1e3:.1f} ms "
         "(reads overlap with compute)"),
        (f"prefill {pred.prefill_tokens_per_s:.1f} tok/s ({prompt}-token prompt), "
         f"decode {pred.decode_tokens_per_s:.2f} tok/s (bottleneck: {pred.bottleneck})"),
    ]
    lines += [f"note: {n}" for n in pred.notes]
    return "\n".join(lines)
