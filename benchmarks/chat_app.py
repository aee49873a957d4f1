"""Measure the chat app as a user meets it: `edgerun chat` started in a subprocess, driven by headless chromium.

Figures:
- startup: seconds from starting `edgerun chat` to the URL being printed, and to the page rendered in the
  browser (navigation done and the message box visible);
- per reply (the same message, a fixed seed, --replies times, each in a fresh chat): the time from pressing
  Enter to the first reply text visible in the page, and the runtime's own figures from the live panel
  (time to first token, decode tokens/s, prompt and generated tokens);
- for comparison, `edgerun bench` on the same model with the same prompt length and token count.

Needs the `playwright` package and a chromium (default /usr/bin/chromium). Example::

    python benchmarks/chat_app.py                          # the demo model
    python benchmarks/chat_app.py mixtral-q4 --ram 12GiB --json
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def panel_figures(text: str) -> dict:
    """The live panel's figures from its text."""
    def number(pattern: str) -> float:
        m = re.search(pattern, text, re.I | re.S)
        return float(m.group(1)) if m else float("nan")
    return {
        "decode_tokens_per_s": number(r"decode\s*([\d.]+)\s*tok/s"),
        "time_to_first_token_s": number(r"first token\s*([\d.]+)\s*ms") / 1000,
        "prompt_tokens": int(number(r"prompt\s*(\d+)\s*tokens") if re.search("prompt", text, re.I) else -1),
        "generated_tokens": int(number(r"last reply: (\d+) tokens") if "last reply" in text else -1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="MODEL for edgerun chat (default: the demo model)")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--ram", default=None)
    ap.add_argument("--message", default="Good morrow! What news from the city?")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--replies", type=int, default=5)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--screenshot", default=None, metavar="PNG", help="save the page after the last reply")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    port = free_port()
    cmd = [sys.executable, "-m", "edgerun.cli", "chat", "--port", str(port)]
    cmd += [args.model] if args.model else []
    cmd += ["--quant", args.quant] if args.quant else []
    cmd += ["--ram", args.ram] if args.ram else []
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out: dict = {"command": " ".join(cmd[2:])}
    try:
        line = ""
        while "serving" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                sys.exit(f"edgerun chat exited with {proc.returncode}")
        out["startup_to_url_s"] = time.perf_counter() - t0
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            tab = browser.new_page(viewport={"width": 1440, "height": 900})
            tab.goto(url)
            box = tab.locator("#er-input textarea")
            box.wait_for(state="visible")
            out["startup_to_page_rendered_s"] = time.perf_counter() - t0
            tab.locator("#er-seed input").fill("1")
            tab.locator("#er-max-tokens input[type=number]").fill(str(args.max_tokens))
            tab.locator("#er-max-tokens input[type=number]").press("Enter")
            replies = []
            for i in range(args.replies):
                tab.locator("#er-clear").click()
                tab.wait_for_function("() => document.querySelectorAll('#er-chat .bot').length === 0")
                t = time.perf_counter()
                box.fill(f"{i + 1}. {args.message}")  # a new start: no prefix of the last prompt to reuse
                box.press("Enter")
                tab.wait_for_function(
                    "() => [...document.querySelectorAll('#er-chat .bot')].some(b => b.innerText.trim().length)",
                    polling=5)
                shown = time.perf_counter() - t
                tab.wait_for_function("() => document.querySelector('#er-stats').innerText.includes('last reply')"
                                      " && !document.querySelector('#er-stats').innerText.includes('generating')")
                tab.wait_for_timeout(1200)  # one more refresh of the panel, with the final figures
                figures = panel_figures(tab.locator("#er-stats").inner_text())
                while figures["generated_tokens"] < 0:  # read while the panel was being redrawn
                    tab.wait_for_timeout(100)
                    figures = panel_figures(tab.locator("#er-stats").inner_text())
                figures["first_text_in_page_s"] = shown
                replies.append(figures)
            if args.screenshot:
                tab.screenshot(path=args.screenshot)
            browser.close()
        out["replies"] = replies
        for key in ("first_text_in_page_s", "time_to_first_token_s", "decode_tokens_per_s"):
            out[f"median_{key}"] = statistics.median(r[key] for r in replies)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    prompt = replies[-1]["prompt_tokens"]
    tokens = int(statistics.median(r["generated_tokens"] for r in replies))
    if args.model:
        model = args.model
    else:
        from edgerun.demo_model import demo_model_dir

        model = str(demo_model_dir())
    bench = [sys.executable, "-m", "edgerun.cli", "bench", model, "--prompt-tokens", str(prompt), "--tokens",
             str(tokens), "--repeats", str(args.replies), "--no-kernels", "--json"]
    bench += ["--quant", args.quant] if args.quant else []
    bench += ["--ram", args.ram] if args.ram else []
    result = json.loads(subprocess.run(bench, capture_output=True, text=True, check=True).stdout)
    out["bench"] = {k: result[k] for k in ("prompt_tokens", "decode_tokens", "prefill_tokens_per_s",
                                           "decode_tokens_per_s", "time_to_first_token_s")}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['command']}: URL after {out['startup_to_url_s']:.2f} s, page rendered after "
          f"{out['startup_to_page_rendered_s']:.2f} s")
    for r in replies:
        print(f"  reply: {r['prompt_tokens']} prompt tokens, {r['generated_tokens']} generated; first text in the "
              f"page {r['first_text_in_page_s'] * 1000:.0f} ms, time to first token "
              f"{r['time_to_first_token_s'] * 1000:.0f} ms, decode {r['decode_tokens_per_s']:.1f} tok/s")
    b = out["bench"]
    print(f"edgerun bench, {b['prompt_tokens']} prompt tokens, {b['decode_tokens']} decoded: time to first token "
          f"{b['time_to_first_token_s'] * 1000:.0f} ms, prefill {b['prefill_tokens_per_s']:.0f} tok/s, decode "
          f"{b['decode_tokens_per_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
