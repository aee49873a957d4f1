"""`edgerun bench MODEL`: measured prefill and decode speed of a model, and of the quantized kernels
against this machine's RAM bandwidth. Figures are medians of several runs. With --ram the model runs under
that memory budget, experts streaming from the store; --cold drops the store from the page cache first."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys

from ..units import format_size
from .run import add_approximate_args, add_gpu_args, approximate_kwargs, gpu_kwargs, layer_weights_text, note_exact


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure tokens/s and kernel throughput", description=__doc__)
    p.add_argument("model", metavar="MODEL",
                   help="HF model directory, repo id in the HF cache, Grok-1's release (ckpt-0/), or store")
    p.add_argument("--quant", default=None, choices=["none", "bf16", "q8", "q4", "mxfp4"],
                   help="convert a checkpoint first (cached), as edgerun.load(..., quant=) does")
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prefill length (default 128)")
    p.add_argument("--tokens", type=int, default=64, metavar="N", help="tokens to decode (default 64)")
    p.add_argument("--temp", type=float, default=1.0, metavar="T",
                   help="sampling temperature, seeded (default 1: greedy decoding of a random-weight model loops "
                        "over a few tokens and routes unlike a real one)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs to take the median of (default 3)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: edgerun.load's pick)")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="memory budget of the whole process, e.g. 4GiB (default: what the machine has)")
    add_gpu_args(p)
    add_approximate_args(p)
    p.add_argument("--routing-trace", default=None, metavar="FILE.jsonl",
                   help="route every token as this recorded trace does (edgerun trace's format), so that the "
                        "cache and read-ahead meet a real model's routing; the model needs the trace's MoE layers, "
                        "experts and experts per token")
    p.add_argument("--cold", action="store_true", help="drop the store's files from the page cache first")
    p.add_argument("--policy", default="default", choices=["default", "lru", "lfu"], help="expert cache policy")
    p.add_argument("--no-prefetch", action="store_true", help="load experts only when a layer asks for them")
    p.add_argument("--ctx", type=int, default=None, metavar="N",
                   help="context length (default: room for the prompt and the tokens, at least 512)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel and RAM bandwidth section")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(main=main)


def measure_model(model, prompt_tokens: int, tokens: int, repeats: int, temperature: float = 1.0,
                  cold: bool = False) -> dict:
    """Medians of `repeats` generations after a warm-up; with `cold`, the first generation after loading (the
    model just loaded from a store out of the page cache) is reported on its own as "cold_run"."""
    rng = random.Random(0)
    vocab = model.spec.vocab_size
    prompt_tokens = min(prompt_tokens, model.context_length - tokens - 1)
    first = None
    if cold:
        prompt = [rng.randrange(vocab) for _ in range(prompt_tokens)]
        model.generate_ids(prompt, tokens, temperature=temperature, seed=repeats, ignore_eos=True)
        s = model.stats()
        first = {k: s[k] for k in ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s")}
        first["seconds_after_load"] = s["prefill_seconds"] + s["decode_seconds"]
        if "warmup" in s:
            first["warmup"] = s["warmup"]
    else:
        model.generate_ids([rng.randrange(vocab) for _ in range(8)], 4, temperature=0, ignore_eos=True)  # warm-up
    runs = []
    for i in range(repeats):
        prompt = [rng.randrange(vocab) for _ in range(prompt_tokens)]  # a fresh prompt: no prefix reuse
        model.generate_ids(prompt, tokens, temperature=temperature, seed=i, ignore_eos=True)
        runs.append(model.stats())
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    last = runs[-1]
    out = {
        "model": str(model.path), "model_type": model.spec.model_type, "quant": last.get("quant"),
        "expert_format": last.get("expert_format", last.get("dtype")), "dtype": last["dtype"],
        "threads": last["threads"], "prompt_tokens": prompt_tokens, "decode_tokens": tokens, "repeats": repeats,
        "temperature": temperature, "context_length": model.context_length,
        "prefill_tokens_per_s": med("prefill_tokens_per_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
        "time_to_first_token_s": med("time_to_first_token_s"), "weights_bytes": last["weights_bytes"],
        "load_seconds": last["load_seconds"], "peak_rss_bytes": last["peak_rss_bytes"],
        "ram_budget_bytes": last.get("ram_budget_bytes"), "offload": last["offload"],
    }
    if first is not None:
        out["cold_run"] = first
    if last["offload"]:
        for key in ("hit_rate", "prefetch_hit_rate", "late_prefetch_rate", "demand_read_rate", "prefetch_recall",
                    "prefetch_precision", "bytes_read", "skipped_rate", "substituted_rate", "low_served_rate",
                    "decode_bytes_read", "bytes_read_per_token", "read_stall_seconds", "read_stall_per_token",
                    "read_busy_share", "decode_read_bytes_per_s", "speculative_reads", "speculative_reads_used"):
            out[key] = med(key)
        for key in ("policy", "expert_slots", "experts_total", "prefetch_depth", "expert_bytes_per_token",
                    "ideal_bytes_per_token", "direct_io", "skip_below", "substitute_below", "low_below",
                    "low_when_late", "low_format", "low_reads", "low_upgrades", "low_read_overs",
                    "forecast_precision"):
            out[key] = last[key]
    else:
        out.update(hit_rate=1.0, bytes_read=0, prefetch_recall=None)
    if "gpu_hit_rate" in last:  # the GPU tier
        for key in ("gpu_hit_rate", "gpu_prefetch_hit_rate", "ram_hit_rate", "h2d_bytes_per_token", "h2d_bytes",
                    "gpu_expert_share", "cpu_expert_share", "decode_gpu_expert_share", "decode_cpu_expert_share",
                    "copy_wait_seconds"):
            out[key] = med(key)
        out.update({key: last[key] for key in ("device", "gpu_expert_slots", "experts_total", "misses", "gpu_copies",
                                               "tier_bytes")})
        out["gpu_plan"] = last["memory_plan"]["gpu"]
    return out


def measure_kernels(threads: int) -> dict:
    from .. import native
    from ..native import bench

    native.warmup()
    ram = {str(n): bench.ram_read_bandwidth(n) for n in sorted({1, threads})}
    out = {"backend": native.BACKEND, "threads": threads, "ram_read_gbps": ram}
    for fmt in ("q8", "q4", "mxfp4"):
        gbps = bench.gemv_throughput(fmt, threads)
        out[f"{fmt}_gemv_gbps"] = gbps
        out[f"{fmt}_gemv_vs_ram"] = gbps / ram[str(threads)]
        out[f"{fmt}_gemm_gflops"] = bench.gemm_throughput(fmt, threads)
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    import edgerun

    routing = None
    if args.routing_trace:  # a bad trace fails before the model loads
        from ..runtime.trace import TracedRouting, read_trace

        routing = TracedRouting(read_trace(args.routing_trace))
    if args.cold:
        _drop_page_cache(args.model, args.quant)
    ctx = args.ctx or max(512, args.prompt_tokens + args.tokens + 16)
    model = edgerun.load(args.model, quant=args.quant, threads=args.threads, ram=args.ram, policy=args.policy,
                         prefetch=not args.no_prefetch, context_length=ctx, **approximate_kwargs(args),
                         **gpu_kwargs(args))
    note_exact(model)
    if routing is not None:
        routing.install(model.decoder)
    result = measure_model(model, args.prompt_tokens, args.tokens, max(1, args.repeats), args.temp, args.cold)
    result["cold"] = args.cold
    result["routing_trace"] = args.routing_trace
    if not args.no_kernels:
        result["kernels"] = measure_kernels(torch.get_num_threads())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"model      {result['model']} ({result['model_type']}, experts {result['expert_format']}, "
          f"{format_size(result['weights_bytes'])})")
    if result["routing_trace"]:
        print(f"routing    as recorded in {result['routing_trace']}")
    cold = result.get("cold_run")
    if cold:
        print(f"cold       first token {cold['time_to_first_token_s'] * 1e3:.0f} ms, then decode "
              f"{cold['decode_tokens_per_s']:.1f} tok/s ({result['decode_tokens']} tokens, the first run after "
              f"loading{'; the store read ahead' if 'warmup' in cold else ''})")
    print(f"prefill    {result['prefill_tokens_per_s']:.1f} tok/s ({result['prompt_tokens']} tokens)")
    print(f"decode     {result['decode_tokens_per_s']:.1f} tok/s ({result['decode_tokens']} tokens, "
          f"median of {result['repeats']}, {result['threads']} threads)")
    if result["offload"]:
        print(f"memory     peak RSS {format_size(result['peak_rss_bytes'])} of a "
              f"{format_size(result['ram_budget_bytes'])} budget; expert cache {result['expert_slots']} of "
              f"{result['experts_total']} experts "
              f"({result['policy']} policy{', cold start' if result['cold'] else ''})")
        print(f"experts    {100 * result['hit_rate']:.1f}% cache hits, {100 * result['prefetch_hit_rate']:.1f}% "
              f"prefetched in time, {100 * result['late_prefetch_rate']:.1f}% late, "
              f"{100 * result['demand_read_rate']:.1f}% read on demand"
              + (f"; {100 * result['skipped_rate']:.1f}% of the decoded experts left out (weight below "
                 f"{layer_weights_text(result['skip_below'])})" if result["skip_below"] else "")
              + (f"; {100 * result['substituted_rate']:.1f}% replaced by experts in memory (weight below "
                 f"{layer_weights_text(result['substitute_below'])})" if result["substitute_below"] else "")
              + (f"; {100 * result['low_served_rate']:.1f}% served by {result['low_format']} copies ("
                 + ", ".join(([f"weight below {layer_weights_text(result['low_below'])}"]
                              if result["low_below"] else []) + (["read late"] if result["low_when_late"] else []))
                 + ")"
                 if result["low_below"] or result["low_when_late"] else ""))
        print(f"prefetch   recall "
              f"{100 * result['prefetch_recall']:.1f}% (precision {100 * result['prefetch_precision']:.1f}%, depth "
              f"{result['prefetch_depth']}), read {format_size(result['bytes_read_per_token'])} per token (ideal "
              f"{format_size(result['ideal_bytes_per_token'])}), "
              f"{'direct' if result['direct_io'] else 'buffered'} reads"
              + (f"; {result['speculative_reads'] / result['decode_tokens']:.1f} speculative reads per token, "
                 f"{100 * result['speculative_reads_used'] / result['speculative_reads']:.0f}% used"
                 if result.get("speculative_reads") else ""))
        print(f"disk       reading {100 * result['read_busy_share']:.0f}% of the decode time, at "
              f"{format_size(result['decode_read_bytes_per_s'])}/s; a token waited "
              f"{1e3 * result['read_stall_per_token']:.1f} ms for reads")
    else:
        print(f"memory     peak RSS {format_size(result['peak_rss_bytes'])}, all experts resident")
    if "gpu_hit_rate" in result:
        plan = result["gpu_plan"]
        print(f"gpu        {result['device']}: {format_size(plan['budget_bytes'])} budget, "
              f"{'dense weights and KV cache' if plan['dense'] else 'no dense weights'} on it, "
              f"{result['gpu_expert_slots']} of {result['experts_total']} experts; "
              f"{100 * result['gpu_hit_rate']:.1f}% hits in decode ({100 * result['gpu_prefetch_hit_rate']:.1f}% "
              f"copied ahead), RAM {100 * result['ram_hit_rate']:.1f}% of the rest")
        print(f"misses     {result['misses']}: expert calls {100 * result['gpu_expert_share']:.0f}% GPU / "
              f"{100 * result['cpu_expert_share']:.0f}% CPU (decode {100 * result['decode_gpu_expert_share']:.0f}% / "
              f"{100 * result['decode_cpu_expert_share']:.0f}%), {format_size(result['h2d_bytes_per_token'])} "
              f"host-to-device per token")
    k = result.get("kernels")
    if k:
        ram = ", ".join(f"{v:.1f} GB/s with {n} thread{'s' if n != '1' else ''}" for n, v in k["ram_read_gbps"].items())
        print(f"RAM read   {ram}")
        for fmt in ("q8", "q4", "mxfp4"):
            print(f"{fmt:<5} GEMV {k[f'{fmt}_gemv_gbps']:.1f} GB/s of weights "
                  f"({100 * k[f'{fmt}_gemv_vs_ram']:.0f}% of RAM bandwidth); "
                  f"GEMM {k[f'{fmt}_gemm_gflops']:.1f} GFLOP/s")
        if k["backend"] != "numba":
            print("kernels    NumPy fallback (numba unavailable): expect far lower figures", file=sys.stderr)
    return 0


def _drop_page_cache(model: str, quant: str | None) -> None:
    from ..checkpoint.source import locate
    from ..store.convert import cached_store_path
    from ..store.store import drop_page_cache, is_store

    if is_store(model):
        drop_page_cache(model)
        return
    src = locate(model)
    for f in src.files:
        drop_page_cache(f)
    if quant not in (None, "none"):
        drop_page_cache(cached_store_path(src, quant, None, 32))
