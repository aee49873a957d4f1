"""Decode speed with a real model's routing: a generated Mixtral-shaped q4 store with the trace's shape (32 MoE
layers of 8 experts, top-2) runs `edgerun bench --routing-trace` under RAM budgets that hold a share of its experts,
with each cache policy and without read-ahead, next to the store's own (random, near-uniform) routing.

Every run is `edgerun bench STORE --ram BUDGET --cold --json` in a fresh process. A budget is found from the
store's plan: the fixed part of a load without a budget (baseline, resident weights, KV cache, scratch) plus the
asked share of the expert chunks and the planner's safety margin, then checked against the slots the run reports.

    python benchmarks/routing_trace.py --workdir ../trace-model --out routing-trace.json
    python benchmarks/routing_trace.py --workdir ../trace-model --shares 0.25 --tokens 32 --out routing-trace.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRACE = Path(__file__).resolve().parent.parent / "tests" / "data" / "mixtral_gsm8k_routing.jsonl"
RUNS = (  # (label, extra bench arguments, with the trace)
    ("trace, default policy", ["--policy", "default"], True),
    ("trace, lru", ["--policy", "lru"], True),
    ("trace, default, no read-ahead", ["--policy", "default", "--no-prefetch"], True),
    ("own routing, default policy", ["--policy", "default"], False),
)


def log(t0: float, text: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {text}", file=sys.stderr, flush=True)


def make_store(workdir: Path, a: argparse.Namespace, t0: float) -> Path:
    from edgerun.store.convert import convert
    from edgerun.store.store import is_store
    from edgerun.synthetic import mixtral_config, write_random_mixtral

    name = f"h{a.hidden}-i{a.inter}-l32-e8"
    store = workdir / f"{name}-q4"
    if is_store(store):
        log(t0, f"reusing {store}")
        return store
    hf = workdir / f"{name}-hf"
    log(t0, f"writing a random Mixtral checkpoint to {hf}: hidden {a.hidden}, expert width {a.inter}, 32 layers")
    write_random_mixtral(hf, mixtral_config(a.hidden, 32, 8, a.inter, heads=a.heads, kv_heads=a.kv_heads))
    log(t0, f"converting to {store} (q4 experts, q4 dense matrices)")
    convert(hf, store, quant="q4", dense="q4", progress=False)
    return store


def run_json(cmd: list[str]) -> dict:
    """The JSON a command prints last (edgerun bench prints it indented, llamacpp_baseline.py's bench on one line
    after its progress lines); a failed command raises with the last line it wrote to stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    out = done.stdout.strip()
    return json.loads(out if out.startswith("{") else out.splitlines()[-1])


def bench(store: Path, extra: list[str], a: argparse.Namespace) -> dict:
    return run_json([sys.executable, "-m", "edgerun.cli", "bench", str(store), "--tokens", str(a.tokens),
                     "--prompt-tokens", str(a.prompt_tokens), "--repeats", str(a.repeats), "--no-kernels", "--json",
                     *extra])


# run in a fresh process, as `edgerun bench` runs: the smallest budget whose plan gives SLOTS expert slots
_FIND_BUDGET = """
import json, sys
import edgerun
from edgerun.runtime import placement
from edgerun.runtime.placement import ModelLayout
from edgerun.store.store import ExpertStore

path, ctx, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
plan = edgerun.load(path, context_length=ctx).stats()["memory_plan"]
store = ExpertStore(path)
layout = ModelLayout.for_formats(edgerun.load(path, context_length=ctx).spec, store.quant["experts"],
                                 store.quant["dense"], store.quant["group"])
def got(budget):
    try:
        return placement.place(layout, budget=budget, context=ctx, baseline=plan["baseline_bytes"]).slots
    except placement.BudgetError:
        return -1
lo, hi = 1, 1 << 40
while hi - lo > 1 << 16:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if got(mid) < slots else (lo, mid)
print(json.dumps({"budget": hi, "slots": got(hi), "total": plan["total_experts"]}))
"""


def budget_for(store: Path, share: float, a: argparse.Namespace) -> tuple[int, int]:
    """(RAM budget in bytes, expert slots it gives) for `share` of the experts, planned in a fresh process as
    `edgerun bench` plans it (a tight budget also shortens the prefill steps, which frees room for slots)."""
    ctx = max(512, a.prompt_tokens + a.tokens + 16)  # what bench takes
    total = 32 * 8
    # kernels compiled in the finder's process would count in its baseline (hundreds of MB of compiler) but not
    # in the bench processes, which load them from the cache: compile them first in a process of their own
    subprocess.run([sys.executable, "-c", "from edgerun import native; native.warmup()"], check=True)
    done = subprocess.run([sys.executable, "-c", _FIND_BUDGET, str(store), str(ctx), str(round(share * total))],
                          capture_output=True, text=True, check=True)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["budget"] + (64 << 10), found["slots"]  # a little above: the bench process's own baseline varies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where the generated checkpoint and store go (reused)")
    p.add_argument("--out", required=True, help="write the results here as JSON")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=2816, help="expert width (default 2816: 4.9 MB q4 chunks)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5], help="shares of the experts in RAM")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="generations per run, median (default 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over every setting, interleaved so that a slow minute of the disk hits them all "
                        "alike; the table gives medians over the rounds (default 3)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = make_store(workdir, a, t0)
    report = {"store": str(store), "trace": str(TRACE), "args": vars(a), "runs": []}
    budgets = {share: budget_for(store, share, a) for share in a.shares}
    for rnd, share, (label, extra, traced) in [(r, s, run) for r in range(a.rounds) for s in a.shares for run in RUNS]:
        budget, slots = budgets[share]
        args = ["--ram", str(budget), "--cold", *extra] + (["--routing-trace", str(TRACE)] if traced else [])
        log(t0, f"round {rnd + 1}, {share:.0%} ({slots} slots, budget {budget / 1e9:.3f} GB): {label}")
        try:
            r = bench(store, args, a)
        except RuntimeError as e:
            report["runs"].append({"round": rnd, "share": share, "label": label, "error": str(e)})
            log(t0, f"  failed: {e}")
            continue
        if r["expert_slots"] != slots:
            log(t0, f"  note: the run got {r['expert_slots']} slots, not {slots}")
        report["runs"].append({"round": rnd, "share": share, "label": label, "budget_bytes": budget, **{
            k: r[k] for k in ("expert_slots", "experts_total", "decode_tokens_per_s", "prefill_tokens_per_s",
                              "hit_rate", "prefetch_hit_rate", "demand_read_rate", "bytes_read_per_token",
                              "peak_rss_bytes", "policy", "prefetch_depth")}})
        log(t0, f"  decode {r['decode_tokens_per_s']:.2f} tok/s, hits {r['hit_rate']:.1%}, "
                f"read {r['bytes_read_per_token'] / 1e6:.0f} MB/token")
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'share':>6s} {'run':32s} {'slots':>9s} {'decode tok/s (rounds)':>24s} {'prefill':>8s} {'hits':>6s} "
          f"{'ahead':>6s} {'MB/token':>8s}")
    for share in a.shares:
        for label, _, _ in RUNS:
            rs = [r for r in report["runs"] if r["share"] == share and r["label"] == label and "error" not in r]
            if not rs:
                print(f"{share:6.0%} {label:32s} failed")
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in ("decode_tokens_per_s", "prefill_tokens_per_s",
                                                                    "hit_rate", "prefetch_hit_rate",
                                                                    "bytes_read_per_token")}
            spread = " ".join(f"{r['decode_tokens_per_s']:.1f}" for r in rs)
            print(f"{share:6.0%} {label:32s} {rs[0]['expert_slots']:>4d}/{rs[0]['experts_total']:<4d} "
                  f"{med['decode_tokens_per_s']:6.2f} ({spread}){'':>2s} {med['prefill_tokens_per_s']:8.1f} "
                  f"{med['hit_rate']:6.1%} {med['prefetch_hit_rate']:6.1%} {med['bytes_read_per_token'] / 1e6:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
