"""Resident speed side by side with llama.cpp: a Mixtral-shaped model (hidden 2048, expert width 5632, 16 layers of 8
experts, top-2, 4 attention heads and 2 KV heads; random weights) wholly in RAM, as an edgerun q4 store with
`--dense q4` (output head q8) and as a Q4_0 GGUF of the same checkpoint (output Q8_0; `llamacpp_baseline.py
convert`), greedy decoding on the same number of threads.

Every run is a fresh process: `edgerun bench STORE --temp 0 --json` (medians of --repeats generations) and
`llamacpp_baseline.py bench GGUF --json` (llama.cpp's default mode: mmap, weights repacked for the CPU), after one
untimed run of each that loads its files from the disk into the page cache; --rounds rounds alternate the two so
that the machine's slow minutes hit both. The table gives medians and edgerun's ratio to llama.cpp.

With --cold, each run starts with its files dropped from the page cache instead (`edgerun bench --cold`, whose store
is read ahead in the background at load; llama.cpp reads and repacks its weights at load): the time from the
start of loading to the first token, and the decode speed of that first generation.

    python benchmarks/resident_llamacpp.py --workdir ../resident-model --out resident.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from routing_trace import run_json  # noqa: E402


def log(t0: float, text: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {text}", file=sys.stderr, flush=True)


def make_files(workdir: Path, a: argparse.Namespace, t0: float) -> tuple[Path, Path]:
    """(store, gguf) in workdir, made from one random checkpoint unless there already."""
    from edgerun.store.convert import convert
    from edgerun.store.store import is_store
    from edgerun.synthetic import mixtral_config, write_random_mixtral

    hf, store, gguf = workdir / "hf", workdir / "store-q4d", workdir / "model-q4_0.gguf"
    if not (hf / "config.json").exists():
        log(t0, f"writing a random Mixtral checkpoint to {hf}")
        write_random_mixtral(hf, mixtral_config(a.hidden, a.layers, 8, a.inter, heads=a.heads, kv_heads=a.kv_heads))
    if not is_store(store):
        log(t0, f"converting to {store} (q4 experts and matrices, q8 output head)")
        convert(hf, store, quant="q4", dense="q4", progress=False)
    if not gguf.exists():
        log(t0, f"writing {gguf} (Q4_0, output Q8_0)")
        import llamacpp_baseline

        llamacpp_baseline.convert(hf, gguf, "q8_0", "q4_0")
    return store, gguf


def edgerun_run(store: Path, a: argparse.Namespace) -> dict:
    r = run_json([sys.executable, "-m", "edgerun.cli", "bench", str(store), "--threads", str(a.threads), "--temp", "0",
             "--prompt-tokens", str(a.prompt_tokens), "--tokens", str(a.tokens), "--repeats", str(a.repeats),
             "--no-kernels", "--json"] + (["--cold"] if a.cold else []))
    out = {"decode_tokens_per_s": r["decode_tokens_per_s"], "prefill_tokens_per_s": r["prefill_tokens_per_s"],
           "peak_rss_bytes": r["peak_rss_bytes"]}
    if a.cold:
        first = r["cold_run"]
        out.update(first_token_after_start_s=r["load_seconds"] + first["time_to_first_token_s"],
                   cold_decode_tokens_per_s=first["decode_tokens_per_s"])
    return out


def llamacpp_run(gguf: Path, a: argparse.Namespace) -> dict:
    if a.cold:
        from disk_read import drop_cache

        drop_cache([gguf])
    r = run_json([sys.executable, str(HERE / "llamacpp_baseline.py"), "bench", str(gguf), "--threads", str(a.threads),
             "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.tokens), "--json"])
    out = {"decode_tokens_per_s": r["decode_tok_s"], "prefill_tokens_per_s": r["prompt_tok_s"],
           "peak_rss_bytes": int(r["peak_rss_mb"] * (1 << 20))}
    if a.cold:  # its prompt step gives the first token; its one generation is the cold one
        out.update(first_token_after_start_s=r["load_s"] + r["prompt_s"], cold_decode_tokens_per_s=r["decode_tok_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="where the checkpoint, the store and the GGUF go (reused)")
    p.add_argument("--out", required=True, help="write the results here as JSON")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="edgerun generations per run, median (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--cold", action="store_true", help="each run with its files out of the page cache")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store, gguf = make_files(workdir, a, t0)
    report: dict = {"args": vars(a), "edgerun": [], "llama.cpp": []}
    if not a.cold:  # into the page cache by each engine's own load from the disk, as after a reboot (a store read
        # by anything else, its convert's writes included, sits in small page-cache folios, not huge pages)
        first = argparse.Namespace(**{**vars(a), "cold": True})
        edgerun_run(store, first), llamacpp_run(gguf, first)
    for rnd in range(a.rounds):
        for name, fn, path in (("edgerun", edgerun_run, store), ("llama.cpp", llamacpp_run, gguf)):
            r = fn(path, a)
            report[name].append(r)
            log(t0, f"round {rnd + 1} {name}: decode {r['decode_tokens_per_s']:.2f} tok/s, prefill "
                    f"{r['prefill_tokens_per_s']:.2f} tok/s")
            Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    med = {name: {k: statistics.median(r[k] for r in report[name]) for k in report[name][0]}
           for name in ("edgerun", "llama.cpp")}
    report["medians"] = med
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':10s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'peak RSS':>9s}"
          + (f" {'first token after start':>24s} {'cold decode tok/s':>17s}" if a.cold else ""))
    for name in ("edgerun", "llama.cpp"):
        m = med[name]
        print(f"{name:10s} {m['decode_tokens_per_s']:12.2f} {m['prefill_tokens_per_s']:13.2f} "
              f"{m['peak_rss_bytes'] / 2**30:7.2f} GiB"
              + (f" {m['first_token_after_start_s']:22.2f} s {m['cold_decode_tokens_per_s']:17.2f}" if a.cold else ""))
    e, ll = med["edgerun"], med["llama.cpp"]
    print(f"{'ratio':10s} {e['decode_tokens_per_s'] / ll['decode_tokens_per_s']:11.2f}x "
          f"{e['prefill_tokens_per_s'] / ll['prefill_tokens_per_s']:12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
