"""Light experts that miss, left out (`skip_below`), replaced by experts in memory (`substitute_below`) or read from
their low-bit copies (`low_below`, copies made by `edgerun convert STORE --low-bits q2|q3`): what each costs in
quality and what it buys in speed, setting by setting.

Quality: the demo model (trained on Tiny Shakespeare) converted to a q4 store in --workdir (or, with --model
larger, a larger model trained for this by training/train_demo.py in the same way: 8 layers, hidden size 256,
expert width 512, 28M parameters, about 12 minutes on 2 cores; trained into --workdir if missing), its experts in a
RAM cache of 25% and 50% of them, scores the first --tokens held-out tokens one decode step at a time
(`Model.logits(ids, decode=True)`, in windows of its 256-token context, each token once), against exact decoding:
perplexity, the shares of decoded experts left out, replaced and served by copies, and the bytes read per token.
"calibrated per layer" replaces light misses below thresholds of each layer that `edgerun.calibrate` picks for 1% at
that budget on the --calibration-tokens held-out tokens after the scored ones (a threshold for each of
--calibration-groups runs of consecutive layers); "calibrated per layer, skip 0.2" leaves out the light misses below
0.2 and replaces those from 0.2 up to the same thresholds; "calibrated, q3 for the rest" (and with skip 0.2) reads
every other miss from its q3 copy, read-ahead included, a copy in memory standing in for a light miss as a chunk
would.

Speed: the store of `routing_trace.py` of --hidden and --inter (by default the shape of the model measured against
llama.cpp, hidden 2048 and expert width 5632, at the trace's 32 layers; generated in --workdir if missing, q2 or q3
copies added as each setting needs) with the Mixtral trace's routing and weights, `edgerun bench --ram BUDGET --cold
--routing-trace TRACE` with each setting's options in fresh processes, budgets of 25% and 50% of its experts;
--rounds interleaved rounds, each starting at another setting, medians. The trace gives the probabilities of the
experts it chose only, so an expert standing in for a light miss there is one in memory with no rank (and a weight of
0): it costs what a real one would (a computed expert, no read) but says nothing of quality, which the demo model
measures. Its 32 layers take the calibrated thresholds of the model measured for quality by depth (with the demo
model's 4 MoE layers, the first quarter those of its first layer). The shape matters: with a quarter of the expert
size (--hidden 1024 --inter 2816) the work of each layer that does not grow with its experts (scheduling the reads,
attention) takes a larger share of a token, and where few bytes are read that work, not the disk, sets the pace.

    python benchmarks/light_misses.py --workdir ../trace-model --out light-misses.json
    python benchmarks/light_misses.py --workdir ../trace-model --out larger.json --model larger --skip-speed \
        --settings "skip 0.2" "skip 0.25" "skip 0.3" "substitute 0.25" "substitute 0.3" "substitute 0.35" \
        "substitute 0.4" "substitute 0.5" "calibrated per layer" "q3 all misses" "q2 below 0.5"
    python benchmarks/light_misses.py --workdir ../trace-model --out larger.json --model larger --reuse-quality \
        --settings "calibrated per layer" "calibrated per layer, skip 0.2"   # their speed on the trace store (and
                                                                            # the quality of a setting the file lacks)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing_trace  # noqa: E402 (the trace store and its budgets)

ROOT = Path(__file__).resolve().parent.parent


class Setting(NamedTuple):
    name: str
    skip: float = 0.0  # skip_below
    low: float = 0.0  # low_below
    late: bool = False  # low_when_late
    fmt: str | None = None  # the copies it reads
    sub: float = 0.0  # substitute_below
    calibrated: bool = False  # substitute_below per layer, from `calibrate` on other held-out text at the budget
    # (with skip: left out below it, replaced from it up to the calibrated thresholds)
    given: bool = False  # substitute_below per layer, given for each budget by --given


# the speed runs take every setting but QUALITY_ONLY's, those with q3 copies last in each round, with the store's
# copies made again in q3
SETTINGS = [Setting("exact"), Setting("skip 0.2", skip=0.2), Setting("skip 0.25", skip=0.25),
            Setting("skip 0.3", skip=0.3), Setting("skip 0.35", skip=0.35), Setting("skip 0.4", skip=0.4),
            Setting("substitute 0.25", sub=0.25), Setting("substitute 0.3", sub=0.3),
            Setting("substitute 0.35", sub=0.35), Setting("substitute 0.4", sub=0.4),
            Setting("substitute 0.5", sub=0.5), Setting("calibrated per layer", calibrated=True),
            Setting("calibrated per layer, skip 0.2", skip=0.2, calibrated=True),
            Setting("given per layer, skip 0.2", skip=0.2, given=True),
            Setting("calibrated, q3 for the rest", low=0.999, fmt="q3", calibrated=True),
            Setting("calibrated, skip 0.2, q3 for the rest", skip=0.2, low=0.999, fmt="q3", calibrated=True),
            Setting("q3 below 0.5", low=0.5, fmt="q3"), Setting("q3 all misses", low=0.999, fmt="q3"),
            Setting("q3 when late", late=True, fmt="q3"),
            Setting("q3 when late, skip 0.25", skip=0.25, late=True, fmt="q3"),
            Setting("q2 below 0.3", low=0.3, fmt="q2"), Setting("q2 below 0.5", low=0.5, fmt="q2"),
            Setting("q2 all misses", low=0.999, fmt="q2"),
            Setting("q2 below 0.5, skip 0.2", skip=0.2, low=0.5, fmt="q2"),
            Setting("q2 when late", late=True, fmt="q2"),
            Setting("q2 when late, skip 0.25", skip=0.25, late=True, fmt="q2")]
QUALITY_ONLY = {"q3 below 0.5", "q3 all misses"}  # measured for speed in q2 instead
# the larger model: the demo's recipe (data, tokenizer, steps, optimizer, seed) at twice the depth, 1.6x the width
LARGER = ["--layers", "8", "--hidden", "256", "--inter", "512"]


def quality_model(a: argparse.Namespace) -> Path:
    """The q4 store of the model whose quality is measured: the demo model's, or the larger model's (trained first
    when --workdir has none)."""
    from edgerun.demo_model import demo_model_dir
    from edgerun.store.convert import convert
    from edgerun.store.store import is_store

    work = Path(a.workdir)
    path = work / f"{a.model}-q4"
    if is_store(path):
        return path
    source = demo_model_dir()
    if a.model == "larger":
        source = work / "larger-model"
        if not (source / "metrics.json").is_file():
            print(f"training the larger model into {source}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, str(ROOT / "training" / "train_demo.py"), "--out", str(source), *LARGER],
                           check=True)
    convert(source, path, quant="q4", progress=False)
    return path


def quality(a: argparse.Namespace, report: dict) -> None:
    """The quality rows of the settings and shares that report has none of yet (calibrating at a share only where
    report has no calibration for it)."""
    have = {(r["share"], r["setting"]) for r in report["quality"]}
    if all((share, st.name) in have for share in a.shares for st in a.settings):
        return
    sys.path.insert(0, str(ROOT / "training"))
    import train_demo

    import edgerun
    from edgerun.calibrate import calibrate, score
    from edgerun.runtime.offload import OffloadedExperts
    from edgerun.store.lowbit import add_low_copies
    from edgerun.store.store import ExpertStore

    path = quality_model(a)
    model = edgerun.load(path, context_length=257)
    report["model"] = {"name": a.model, **{k: getattr(model.spec, k) for k in (
        "num_layers", "hidden_size", "moe_intermediate_size", "num_experts", "top_k")}}
    layers = len(model.spec.moe_layers)
    for share, weights in a.given.items():
        if len(weights) != layers:
            sys.exit(f"light_misses.py: error: --given {share:g}= has {len(weights)} thresholds; the {a.model} model "
                     f"has {layers} MoE layers")
    _, held = train_demo.split_text((ROOT / "training" / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    held_ids = train_demo.encode(lambda t: model.tokenizer.encode(t, add_special_tokens=False), held)[0].tolist()
    ids = held_ids[:a.tokens]  # scored
    calibration_ids = held_ids[a.tokens:a.tokens + a.calibration_tokens]  # what calibration scores: other text
    for fmt in (None, "q3", "q2"):
        if fmt:
            add_low_copies(path, fmt, progress=False)
        store = ExpertStore(path)
        total = len(store.moe_layers) * store.num_experts
        for share in a.shares:
            slots = max(4, round(share * total))
            for st in a.settings:
                if st.fmt != fmt or (share, st.name) in have:
                    continue
                sub = a.given[share] if st.given else st.sub
                if st.calibrated and str(share) in report["calibration"]:
                    sub = report["calibration"][str(share)]["substitute_below"]
                elif st.calibrated:
                    model.use_experts(OffloadedExperts(store, model.spec.activation, slots)).close()
                    c = calibrate(model, calibration_ids, bos=train_demo.BOS,
                                  groups=a.calibration_groups,
                                  log=lambda line: print(f"calibration {share:.0%}: {line}", file=sys.stderr))
                    report["calibration"][str(share)] = {"substitute_below": c.thresholds, "loss": c.loss,
                                                         "tokens": c.exact.tokens, "trials": c.trials}
                    sub = c.thresholds
                experts = OffloadedExperts(store, model.spec.activation, slots, skip_below=st.skip, low_below=st.low,
                                           low_when_late=st.late, substitute_below=sub)
                model.use_experts(experts).close()
                s = score(model, ids, bos=train_demo.BOS)  # in windows of BOS and 255 tokens: the 256-token context
                row = {"share": share, "slots": slots, "setting": st.name, "skip_below": st.skip, "low_below": st.low,
                       "low_when_late": st.late, "substitute_below": sub, "perplexity": s.perplexity,
                       "tokens": s.tokens, "skipped_rate": s.skipped_rate, "substituted_rate": s.substituted_rate,
                       "low_served_rate": s.low_served_rate, "bytes_read_per_token": s.bytes_per_token}
                report["quality"].append(row)
                print(f"quality {share:.0%} ({slots} slots) {st.name}: perplexity {row['perplexity']:.3f}, "
                      f"{row['skipped_rate']:.1%} left out, {row['substituted_rate']:.1%} substituted, "
                      f"{row['low_served_rate']:.1%} from copies, "
                      f"{row['bytes_read_per_token'] / 1e3:.0f} KB/token", file=sys.stderr, flush=True)
                experts.close()


def speed(a: argparse.Namespace, report: dict, t0: float) -> None:
    from edgerun.commands.run import layer_weights_text
    from edgerun.store.lowbit import add_low_copies
    from edgerun.store.store import ExpertStore

    a.heads, a.kv_heads, a.prompt_tokens = 16, 4, 32
    store = routing_trace.make_store(Path(a.workdir), a, t0)

    def copies(fmt: str) -> None:
        low = ExpertStore(store).low_layout
        if low is None or low.fmt != fmt:
            routing_trace.log(t0, f"making {fmt} copies in {store}")
            add_low_copies(store, fmt, progress=False)
            os.sync()  # the copies' writes reach the disk now, not during the next measurement
    plain = [s for s in a.settings if s.name not in QUALITY_ONLY and s.fmt != "q3"]
    q3 = [s for s in a.settings if s.name not in QUALITY_ONLY and s.fmt == "q3"]  # last, the copies made again
    q2 = any(s.fmt == "q2" for s in plain)
    if q2:
        copies("q2")
    budgets = {share: routing_trace.budget_for(store, share, a) for share in a.shares}
    for rnd in range(a.rounds):
        if rnd and q2:
            copies("q2")
        turn = rnd * len(plain) // a.rounds  # each round starts at another setting: none always runs first
        for st in plain[turn:] + plain[:turn] + q3:
            if st.fmt:
                copies(st.fmt)
            for share in a.shares:
                budget, slots = budgets[share]
                sub = str(st.sub)
                if st.calibrated or st.given:  # the measured model's layers stretched over the store's 32, by depth
                    picked = a.given[share] if st.given else report["calibration"][str(share)]["substitute_below"]
                    sub = layer_weights_text([picked[j * len(picked) // 32] for j in range(32)])
                r = routing_trace.bench(store, ["--ram", str(budget), "--cold", "--routing-trace",
                                                str(routing_trace.TRACE), "--skip-below", str(st.skip),
                                                "--substitute-below", sub, "--low-below", str(st.low)]
                                        + (["--low-when-late"] if st.late else []), a)
                report["speed"].append({"round": rnd, "share": share, "slots": r["expert_slots"], "setting": st.name,
                                        **{k: r[k] for k in ("decode_tokens_per_s", "bytes_read_per_token",
                                                             "skipped_rate", "substituted_rate", "low_served_rate",
                                                             "hit_rate")}})
                if r["expert_slots"] != slots:
                    routing_trace.log(t0, f"  note: the run got {r['expert_slots']} slots, not {slots}")
                routing_trace.log(t0, f"speed round {rnd + 1} {share:.0%} {st.name}: "
                                      f"{r['decode_tokens_per_s']:.2f} tok/s, {r['skipped_rate']:.1%} left out, "
                                      f"{r['substituted_rate']:.1%} substituted, "
                                      f"{r['low_served_rate']:.1%} from copies, "
                                      f"{r['bytes_read_per_token'] / 1e6:.0f} MB/token")
                Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where routing_trace.py's store is (made if missing)")
    p.add_argument("--out", required=True, help="write the results here as JSON")
    p.add_argument("--model", choices=["demo", "larger"], default="demo",
                   help="the model whose quality is measured and whose calibration the speed runs take (see above)")
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--hidden", type=int, default=2048, help="speed: the store's hidden size (default 2048)")
    p.add_argument("--inter", type=int, default=5632,
                   help="speed: the store's expert width (default 5632: 19.5 MB q4 chunks, the shape of the model "
                        "measured against llama.cpp; 2816 with --hidden 1024 gives 4.9 MB chunks)")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    p.add_argument("--calibration-tokens", type=int, default=2048,
                   help="held-out tokens after those scored that calibration scores (default 2048)")
    p.add_argument("--calibration-groups", type=int, default=4,
                   help="groups of consecutive MoE layers calibration gives a threshold each (default 4, as "
                        "`edgerun calibrate`; 8 gives each of the larger model's layers its own)")
    p.add_argument("--given", nargs="+", default=[], metavar="SHARE=W,W,...",
                   help='the thresholds of "given per layer, skip 0.2" at a budget, one per MoE layer of the model '
                        'measured for quality, e.g. 0.25=0.2,0.99,0.75,0.75,0.5,0.5,0.5,0.5')
    p.add_argument("--rounds", type=int, default=3, help="speed: rounds over every setting (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="speed: generations per run (default 1)")
    p.add_argument("--skip-speed", action="store_true", help="quality only")
    p.add_argument("--settings", nargs="+", metavar="NAME", choices=[s.name for s in SETTINGS],
                   help="measure only these settings (default: all but the given thresholds; exact is always "
                        "measured)")
    p.add_argument("--reuse-quality", action="store_true",
                   help="take the quality rows and calibration from --out, written by an earlier run, and measure "
                        "the quality of only the settings it has none of")
    a = p.parse_args(argv)
    a.settings = [s for s in SETTINGS if s.name == "exact" or (s.name in a.settings if a.settings else not s.given)]
    try:
        a.given = {float(k): [float(w) for w in v.split(",")] for k, v in (g.split("=", 1) for g in a.given)}
    except ValueError:
        p.error(f"--given takes SHARE=W,W,... (a budget's share and a weight per MoE layer), got {a.given}")
    missing = [share for share in a.shares if share not in a.given]
    if any(s.given for s in a.settings) and missing:
        p.error(f"--given has no thresholds for the budget of {missing[0]:g}")
    t0 = time.perf_counter()
    report: dict = {"args": vars(a), "quality": [], "speed": [], "calibration": {}}
    if a.reuse_quality:
        earlier = json.loads(Path(a.out).read_text())
        report["quality"], report["calibration"] = earlier["quality"], earlier.get("calibration", {})
        report["model"] = earlier.get("model", {"name": a.model})
    quality(a, report)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    if not a.skip_speed:
        scored = a.tokens
        a.tokens = 64  # decoded per speed run
        speed(a, report, t0)
        a.tokens = scored
    print(f"{'share':>6s} {'setting':>30s} {'perplexity':>10s} {'vs exact':>8s} {'left out':>8s} {'replaced':>8s} "
          f"{'copies':>7s} "
          f"{'KB/token':>8s} {'decode tok/s':>12s} {'vs exact':>8s} {'MB/token':>8s}")
    for share in a.shares:
        exact = next(r["perplexity"] for r in report["quality"] if r["share"] == share and r["setting"] == "exact")
        base = [r["decode_tokens_per_s"] for r in report["speed"] if r["share"] == share and r["setting"] == "exact"]
        for name in (s.name for s in a.settings):
            q = next(r for r in report["quality"] if r["share"] == share and r["setting"] == name)
            sp = [r for r in report["speed"] if r["share"] == share and r["setting"] == name]
            tok = statistics.median(r["decode_tokens_per_s"] for r in sp) if sp else None
            speed_cols = (f"{tok:12.2f} {tok / statistics.median(base):8.2f}x "
                          f"{statistics.median(r['bytes_read_per_token'] for r in sp) / 1e6:8.0f}"
                          if sp and base else f"{'-':>12s} {'-':>9s} {'-':>8s}")
            print(f"{share:6.0%} {name:>30s} {q['perplexity']:10.3f} {q['perplexity'] / exact - 1:+8.2%} "
                  f"{q['skipped_rate']:8.1%} {q.get('substituted_rate', 0.0):8.1%} {q['low_served_rate']:7.1%} "
                  f"{q['bytes_read_per_token'] / 1e3:8.0f} "
                  f"{speed_cols}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
