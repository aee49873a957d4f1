"""Leaving out light experts that miss (`skip_below`): what it costs in quality and what it buys in speed, threshold
by threshold.

Quality: the demo model (trained on Tiny Shakespeare) as a q4 store, its experts in a RAM cache of 25% and 50% of
them, scores the first --tokens held-out tokens one decode step at a time (`Model.logits(ids, decode=True)`, in
windows of its 256-token context, each token once), against exact decoding: perplexity, the share of decoded
experts left out and the bytes read per token.

Speed: the store of `routing_trace.py` (generated in --workdir if missing) with the Mixtral trace's routing and
weights, `edgerun bench --ram BUDGET --cold --routing-trace TRACE --skip-below W` in fresh processes, budgets of 25%
and 50% of its experts; --rounds interleaved rounds, medians.

    python benchmarks/skip_misses.py --workdir ../trace-model --out skip-misses.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing_trace  # noqa: E402 (the trace store and its budgets)

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def quality(a: argparse.Namespace, report: dict) -> None:
    sys.path.insert(0, str(ROOT / "training"))
    import numpy as np
    import train_demo

    import edgerun
    from edgerun.demo_model import demo_model_dir
    from edgerun.runtime.offload import OffloadedExperts
    from edgerun.store.store import ExpertStore

    model = edgerun.load(demo_model_dir(), quant="q4", context_length=257)
    _, held = train_demo.split_text((ROOT / "training" / "tinyshakespeare.txt").read_text(encoding="utf-8"))
    ids = train_demo.encode(lambda t: model.tokenizer.encode(t, add_special_tokens=False), held)[0][:a.tokens]
    store = ExpertStore(model.path)
    total = len(store.moe_layers) * store.num_experts
    for share in a.shares:
        for w in THRESHOLDS:
            slots = max(4, round(share * total))
            experts = OffloadedExperts(store, model.spec.activation, slots, skip_below=w)
            model.use_experts(experts).close()
            nll, count, skipped, accesses, read = 0.0, 0, 0, 0, 0
            for start in range(0, len(ids), 255):  # BOS and 255 tokens fill the 256-token context
                window = [train_demo.BOS] + ids[start:start + 255].tolist()
                logits = model.logits(window, decode=True)[:-1].astype(np.float64)
                logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                    - logits.max(-1, keepdims=True)
                target = np.asarray(window[1:])
                nll -= logp[np.arange(len(target)), target].sum()
                count += len(target)
                s = model.stats()  # of this window's decode steps, one per target
                skipped += s["skipped_experts"]
                accesses += len(target) * len(store.moe_layers) * model.spec.top_k
                read += s["decode_bytes_read"]
            row = {"share": share, "slots": slots, "skip_below": w, "perplexity": math.exp(nll / count),
                   "tokens": count, "skipped_rate": skipped / accesses, "bytes_read_per_token": read / count}
            report["quality"].append(row)
            print(f"quality {share:.0%} ({slots} slots) skip below {w}: perplexity {row['perplexity']:.3f}, "
                  f"{row['skipped_rate']:.1%} left out, {row['bytes_read_per_token'] / 1e3:.0f} KB/token",
                  file=sys.stderr, flush=True)
            experts.close()


def speed(a: argparse.Namespace, report: dict, t0: float) -> None:
    a.hidden, a.inter, a.heads, a.kv_heads, a.prompt_tokens = 1024, 2816, 16, 4, 32
    store = routing_trace.make_store(Path(a.workdir), a, t0)
    budgets = {share: routing_trace.budget_for(store, share, a) for share in a.shares}
    for rnd in range(a.rounds):
        for share in a.shares:
            budget, slots = budgets[share]
            for w in THRESHOLDS:
                r = routing_trace.bench(store, ["--ram", str(budget), "--cold", "--routing-trace",
                                                str(routing_trace.TRACE), "--skip-below", str(w)], a)
                report["speed"].append({"round": rnd, "share": share, "slots": r["expert_slots"], "skip_below": w,
                                        **{k: r[k] for k in ("decode_tokens_per_s", "bytes_read_per_token",
                                                             "skipped_rate", "hit_rate")}})
                routing_trace.log(t0, f"speed round {rnd + 1} {share:.0%} skip below {w}: "
                                      f"{r['decode_tokens_per_s']:.2f} tok/s, {r['skipped_rate']:.1%} left out, "
                                      f"{r['bytes_read_per_token'] / 1e6:.0f} MB/token")
                Path(a.out).write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where routing_trace.py's store is (made if missing)")
    p.add_argument("--out", required=True, help="write the results here as JSON")
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    p.add_argument("--rounds", type=int, default=3, help="speed: rounds over every setting (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="speed: generations per run (default 1)")
    p.add_argument("--skip-speed", action="store_true", help="quality only")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    report: dict = {"args": vars(a), "quality": [], "speed": []}
    quality(a, report)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    if not a.skip_speed:
        scored = a.tokens
        a.tokens = 64  # decoded per speed run
        speed(a, report, t0)
        a.tokens = scored
    print(f"{'share':>6s} {'skip below':>10s} {'perplexity':>10s} {'vs exact':>8s} {'left out':>8s} "
          f"{'KB/token':>8s} {'decode tok/s':>12s} {'MB/token':>8s}")
    for share in a.shares:
        exact = next(r["perplexity"] for r in report["quality"] if r["share"] == share and r["skip_below"] == 0)
        for w in THRESHOLDS:
            q = next(r for r in report["quality"] if r["share"] == share and r["skip_below"] == w)
            sp = [r for r in report["speed"] if r["share"] == share and r["skip_below"] == w]
            tok = f"{statistics.median(r['decode_tokens_per_s'] for r in sp):12.2f}" if sp else f"{'-':>12s}"
            mb = f"{statistics.median(r['bytes_read_per_token'] for r in sp) / 1e6:8.0f}" if sp else f"{'-':>8s}"
            print(f"{share:6.0%} {w:10.2f} {q['perplexity']:10.3f} {q['perplexity'] / exact - 1:+8.2%} "
                  f"{q['skipped_rate']:8.1%} {q['bytes_read_per_token'] / 1e3:8.0f} {tok} {mb}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
