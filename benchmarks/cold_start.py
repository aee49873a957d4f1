"""Cold start with the whole store in the budget: time to first token and the speed of the first decoded tokens
right after loading a store that is out of the page cache, with the store read ahead at load (the default) and
without (`--no-prefetch`), next to the warm speed. Every run is `edgerun bench STORE --cold --json` in a fresh
process; settings alternate over `--rounds` rounds and the table gives medians.

    python benchmarks/cold_start.py STORE --out cold-start.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SETTINGS = (("store read ahead at load", []), ("no read-ahead", ["--no-prefetch"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="an edgerun store that fits this machine's RAM")
    p.add_argument("--out", required=True, help="write the results here as JSON")
    p.add_argument("--tokens", type=int, default=32, help="tokens decoded in the first generation (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=4,
                   help="its prompt tokens (default 4: a long prompt would touch most experts before decoding)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over both settings (default 3)")
    a = p.parse_args(argv)
    runs = []
    for rnd in range(a.rounds):
        for label, extra in SETTINGS:
            cmd = [sys.executable, "-m", "edgerun.cli", "bench", a.store, "--cold", "--json", "--no-kernels",
                   "--tokens", str(a.tokens), "--prompt-tokens", str(a.prompt_tokens), "--repeats", "1", *extra]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            cold = r["cold_run"]
            runs.append({"round": rnd, "setting": label, "first_token_s": cold["time_to_first_token_s"],
                         "cold_decode_tokens_per_s": cold["decode_tokens_per_s"],
                         "warm_decode_tokens_per_s": r["decode_tokens_per_s"], "warmup": cold.get("warmup"),
                         "load_seconds": r["load_seconds"]})
            print(f"round {rnd + 1} {label}: first token {cold['time_to_first_token_s']:.2f} s, first "
                  f"{a.tokens} tokens {cold['decode_tokens_per_s']:.1f} tok/s, warm {r['decode_tokens_per_s']:.1f}",
                  file=sys.stderr, flush=True)
            Path(a.out).write_text(json.dumps({"store": a.store, "args": vars(a), "runs": runs}, indent=2) + "\n")
    print(f"{'setting':28s} {'first token':>12s} {f'first {a.tokens} tok/s':>16s} {'warm tok/s':>11s}")
    for label, _ in SETTINGS:
        rs = [r for r in runs if r["setting"] == label]

        def med(key: str) -> float:
            return statistics.median(r[key] for r in rs)
        print(f"{label:28s} {med('first_token_s'):11.2f}s {med('cold_decode_tokens_per_s'):16.1f} "
              f"{med('warm_decode_tokens_per_s'):11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
