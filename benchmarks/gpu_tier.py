"""GPU tier benchmark: decode and prefill speed of a q4 store whose experts are several times the GPU budget, against
the PCIe roofline and against Hugging Face transformers with accelerate's CPU offload of the same model.

Steps, each logged to stderr with the seconds since the start; the JSON file (--out) is rewritten after every
step, so a run that is cut short keeps what it measured:

1. A random-weight Mixtral-shaped checkpoint (HF layout, safetensors, bf16; ``edgerun.synthetic``) is written and
   converted to a q4 store (``edgerun.store.convert.convert``). With --workdir, a checkpoint and store of the same
   sizes left there by an earlier run are reused.
2. This machine's edgerun profile is measured once if there is none (what ``edgerun.load`` would do inside the
   first load), and host-to-device copy rates are measured: pinned and pageable, one expert chunk and 256 MiB
   at a time, and ``edgerun.hw.profile.measure_gpu``'s figures.
3. For each GPU share (default 25 % and 50 % of the q4 expert bytes, plus room for the dense weights, the KV cache
   and scratch as ``placement.plan_gpu`` lays them out), with the store dropped from the page cache:
   ``edgerun.load(store, gpu=BYTES, device=...)`` and ``edgerun.commands.bench.measure_model``; the tier's figures
   are the medians over the repeats of ``model.stats()``. Each run gets its PCIe roofline: h2d bytes/s over the
   h2d bytes per decoded token, and the bound if every GPU miss were copied over (h2d bytes/s over the expert
   bytes of a token times the GPU miss rate).
4. The baseline: ``AutoModelForCausalLM.from_pretrained(HF_DIR, device_map="auto", max_memory={0: BUDGET,
   "cpu": ...}, dtype=float16)`` with the same GPU budget in bytes (its float16 weights are about 3.5 times the
   q4 bytes, so the same budget holds a smaller share of them), greedy ``generate``: time to first token with
   ``max_new_tokens=1``, then the same number of tokens as edgerun decodes. Skipped, with the reason, when
   transformers or accelerate is missing or there is no CUDA device.
5. ``misses="copy"`` and ``misses="cpu"`` at the first share, then the baseline at the other shares, while the
   time limit allows.

Example::

    python benchmarks/gpu_tier.py --out gpu-tier.json
    python benchmarks/gpu_tier.py --layers 24 --shares 0.25 --skip-variants --out gpu-tier.json
    python benchmarks/gpu_tier.py --device cpu --tiny --out gpu-tier-dry.json     # dry run without a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# figures taken from model.stats() after every repeat: medians of the numbers, the last run's structures
MEDIAN_KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s", "gpu_hit_rate",
               "gpu_prefetch_hit_rate", "gpu_prefetch_precision", "ram_hit_rate", "hit_rate", "h2d_bytes_per_token",
               "gpu_expert_share", "cpu_expert_share", "decode_gpu_expert_share", "decode_cpu_expert_share",
               "copy_wait_seconds")
LAST_KEYS = ("gpu_copies", "memory_plan", "tier_bytes", "gpu_expert_slots", "threads", "runtime_settings",
             "load_seconds", "peak_rss_bytes", "weights_bytes", "offload", "ram_budget_bytes")
DEFAULTS = {"hidden": 2048, "inter": 5632, "layers": 16, "experts": 8, "top_k": 2, "heads": 16, "kv_heads": 4,
            "vocab": 32000, "prompt_tokens": 128, "tokens": 64, "repeats": 3}
TINY = {"hidden": 256, "inter": 512, "layers": 4, "experts": 8, "top_k": 2, "heads": 4, "kv_heads": 2,
        "vocab": 32000, "prompt_tokens": 32, "tokens": 16, "repeats": 2}
BULK_COPY = 256 << 20


class Log:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


class Report:
    """The results, written to `path` (atomically) after every step."""

    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = path, data

    def save(self, log: Log) -> None:
        self.data["elapsed_s"] = round(log.elapsed(), 2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def rounded(x: Any, digits: int = 4) -> Any:
    return round(x, digits) if isinstance(x, float) and math.isfinite(x) else x


# -- the machine -------------------------------------------------------------------------------------------------
def _fs_type(path: Path) -> str:
    """The file system type of the mount holding path (tmpfs makes the page-cache drop meaningless)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") or str(path.resolve()) == mount:
                if len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: reported as missing
        return None


def machine_info(device: torch.device, workdir: Path) -> dict:
    import psutil

    import edgerun

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "edgerun": edgerun.__version__, "transformers": _version("transformers"),
            "accelerate": _version("accelerate"), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False), "torch_threads": torch.get_num_threads(),
            "ram_bytes": psutil.virtual_memory().total, "device": str(device), "workdir_fs": _fs_type(workdir)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=total, gpu_free_bytes=free,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    else:
        info.update(gpu_name=f"none: the CPU stands in for a GPU ({info['cpu_model']})")
    return info


# -- the model ---------------------------------------------------------------------------------------------------
def make_model(sizes: dict, workdir: Path, log: Log) -> tuple[Path, Path, dict]:
    """(HF dir, q4 store, timings): written and converted, or reused when workdir holds them at these sizes."""
    from edgerun.store.convert import convert
    from edgerun.store.store import is_store
    from edgerun.synthetic import mixtral_config, write_random_mixtral

    cfg = mixtral_config(sizes["hidden"], sizes["layers"], sizes["experts"], sizes["inter"], vocab=sizes["vocab"],
                         heads=sizes["heads"], kv_heads=sizes["kv_heads"], top_k=sizes["top_k"])
    hf, store = workdir / "hf", workdir / "store-q4"
    out = {"generate_s": None, "convert_s": None, "reused": False}
    try:
        same = json.loads((hf / "config.json").read_text()) == cfg and (hf / "model.safetensors.index.json").exists()
    except (OSError, ValueError):
        same = False
    if same and is_store(store):
        log(f"reusing the checkpoint and store in {workdir}")
        out["reused"] = True
        return hf, store, out
    shutil.rmtree(hf, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(store.with_name(store.name + ".partial"), ignore_errors=True)
    log(f"writing a random Mixtral checkpoint: hidden {sizes['hidden']}, expert width {sizes['inter']}, "
        f"{sizes['layers']} layers, {sizes['experts']} experts top-{sizes['top_k']}")
    t = time.perf_counter()
    write_random_mixtral(hf, cfg)
    out["generate_s"] = round(time.perf_counter() - t, 2)
    log(f"checkpoint written in {out['generate_s']} s ({gb(_dir_bytes(hf))}); converting to q4")
    t = time.perf_counter()
    convert(hf, store, quant="q4", progress=False)
    out["convert_s"] = round(time.perf_counter() - t, 2)
    log(f"store written in {out['convert_s']} s ({gb(_dir_bytes(store))})")
    return hf, store, out


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_layout(store: Path):
    """The store's ModelLayout, as edgerun.load builds it."""
    from edgerun.models import spec_from_config
    from edgerun.runtime.placement import ModelLayout
    from edgerun.store.store import ExpertStore

    s = ExpertStore(store)
    _, spec = spec_from_config(s.config, f"{store} (stored config)")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[s.meta["compute_dtype"]]
    return ModelLayout.for_formats(spec, s.quant["experts"], s.quant["dense"], s.quant["group"], dtype)


def gpu_budget(layout, share: float, device: torch.device, context: int) -> tuple[int, dict]:
    """The smallest GPU budget whose plan puts the dense weights and KV cache on the device and holds
    ceil(share x all experts) expert slots; (bytes, the plan). Planned with placement.place as edgerun.load does."""
    from edgerun.runtime.device import default_dtype
    from edgerun.runtime.placement import GpuRequest, available_ram, current_rss, place

    chunk, total = layout.chunk_bytes, layout.total_experts
    target = max(layout.experts_per_token, min(total, math.ceil(share * total)))

    def plan(budget: int):
        return place(layout, budget=None, context=context, baseline=current_rss(),
                     available=available_ram() + current_rss(),
                     gpu=GpuRequest(str(device), budget, default_dtype(device))).gpu

    def enough(p) -> bool:
        return p.dense and p.slots >= target

    big = plan(1 << 40)  # the reserve at its largest: an upper bound
    hi = big.reserve_bytes + big.scratch_bytes + big.dense_bytes + big.kv_cache_bytes + (target + 1) * chunk
    while not enough(plan(hi)):
        hi *= 2
    lo = 0  # bisect: the slots and the dense weights' place only grow with the budget
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(plan(mid)) else (mid, hi)
    return hi, plan(hi).as_dict() | {"target_slots": target}


# -- host-to-device copies ---------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_gbps(device: torch.device, nbytes: int, pinned: bool, seconds: float = 0.5) -> float:
    """Host-to-device GB/s (10^9 bytes) of nbytes copies, repeated for about `seconds`."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    if pinned and device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=pinned)
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        dst.copy_(src, non_blocking=pinned)
        n += 1
        if n % 4 == 0:
            _sync(device)
            if time.perf_counter() - t0 > seconds:
                break
    dt = time.perf_counter() - t0
    del src, dst
    return n * nbytes / dt / 1e9


def measure_copies(device: torch.device, chunk: int, log: Log) -> dict:
    log("measuring host-to-device copies")
    out: dict[str, Any] = {}
    for name, size in (("chunk", chunk), ("bulk", BULK_COPY)):
        for pinned in (True, False):
            key = f"{name}_{'pinned' if pinned else 'pageable'}_gbps"
            out[key] = round(copy_gbps(device, size, pinned), 3)
    out["chunk_bytes"], out["bulk_bytes"] = chunk, BULK_COPY
    try:
        from edgerun.hw.profile import measure_gpu

        m = measure_gpu(str(device), log=lambda line: None)
        out["edgerun_measure_gpu"] = m
    except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
        out["edgerun_measure_gpu"] = {"error": f"{type(e).__name__}: {e}"}
    log(f"h2d pinned: {out['chunk_pinned_gbps']} GB/s a chunk ({chunk / 1e6:.1f} MB), {out['bulk_pinned_gbps']} "
        f"GB/s 256 MiB at a time; pageable {out['chunk_pageable_gbps']} / {out['bulk_pageable_gbps']} GB/s")
    return out


# -- edgerun -----------------------------------------------------------------------------------------------------
class _Recorded:
    """The model, with every stats() call recorded: measure_model calls it once per repeat."""

    def __init__(self, model) -> None:
        self._model = model
        self.runs: list[dict] = []

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def stats(self) -> dict:
        s = self._model.stats()
        self.runs.append(s)
        return s


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_edgerun(store: Path, device: torch.device, budget: int, share: float, misses: str, args, log: Log) -> dict:
    import edgerun
    from edgerun.commands.bench import measure_model
    from edgerun.store.store import drop_page_cache

    name = f"edgerun {share:.0%}" + ("" if misses == "auto" else f" misses={misses}")
    out: dict[str, Any] = {"kind": "edgerun", "name": name, "share": share, "misses": misses,
                           "gpu_budget_bytes": budget, "cold": not args.warm}
    _free(device)
    if not args.warm:
        out["dropped_bytes"] = drop_page_cache(store)
    log(f"{name}: loading with a GPU budget of {gb(budget)}")
    t = time.perf_counter()
    model = edgerun.load(store, gpu=budget, device=str(device), context_length=args.context, misses=misses,
                         ram=args.ram)
    out["load_s"] = round(time.perf_counter() - t, 2)
    plan = model.stats()["memory_plan"]["gpu"]
    log(f"{name}: loaded in {out['load_s']} s; GPU plan: {plan['slots']} expert slots, dense on device "
        f"{plan['dense']}; measuring {args.repeats} x ({args.prompt_tokens} prompt + {args.tokens} tokens)")
    rec = _Recorded(model)
    t = time.perf_counter()
    try:
        out["measure_model"] = measure_model(rec, args.prompt_tokens, args.tokens, args.repeats, args.temp)
    except KeyError as e:  # the repeats ran; their stats are in rec.runs
        out["measure_model_error"] = f"KeyError {e} in edgerun.commands.bench.measure_model"
        log(f"{name}: measure_model raised KeyError {e}; figures taken from the recorded model.stats()")
    out["measure_s"] = round(time.perf_counter() - t, 2)
    runs = rec.runs
    for key in MEDIAN_KEYS:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = rounded(statistics.median(values)) if values else None
    for key in LAST_KEYS:
        out[key] = runs[-1].get(key) if runs else None
    out["decode_tokens_per_s_runs"] = [rounded(r.get("decode_tokens_per_s"), 3) for r in runs]
    out["prefill_tokens_per_s_runs"] = [rounded(r.get("prefill_tokens_per_s"), 3) for r in runs]
    if device.type == "cuda":
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        out["gpu_within_budget"] = out["gpu_peak_reserved_bytes"] <= budget
    log(f"{name}: decode {out['decode_tokens_per_s']} tok/s, prefill {out['prefill_tokens_per_s']} tok/s, "
        f"GPU hits {out['gpu_hit_rate']}, h2d {mb(out['h2d_bytes_per_token'])}/token")
    model.experts.close()
    del model, rec
    _free(device)
    return out


def roofline(run: dict, h2d_gbps: float, expert_bytes_per_token: int) -> dict:
    """PCIe bounds of a run's decode speed."""
    bps = h2d_gbps * 1e9
    per_token, hit, decode = run.get("h2d_bytes_per_token"), run.get("gpu_hit_rate"), run.get("decode_tokens_per_s")
    out: dict[str, Any] = {"h2d_gbps": h2d_gbps, "expert_bytes_per_token": expert_bytes_per_token}
    if per_token:
        out["roofline_tokens_per_s"] = rounded(bps / per_token, 3)
        out["decode_share_of_roofline"] = rounded(decode / out["roofline_tokens_per_s"]) if decode else None
    else:
        out["roofline_tokens_per_s"] = None  # nothing crossed PCIe while decoding: no bound from it
        out["decode_share_of_roofline"] = None
    if hit is not None and hit < 1:
        out["all_misses_copied_tokens_per_s"] = rounded(bps / (expert_bytes_per_token * (1 - hit)), 3)
        out["decode_share_of_all_misses_copied"] = (rounded(decode / out["all_misses_copied_tokens_per_s"])
                                                    if decode else None)
    else:
        out["all_misses_copied_tokens_per_s"] = out["decode_share_of_all_misses_copied"] = None
    return out


# -- the transformers + accelerate baseline ----------------------------------------------------------------------
def baseline_missing(device: torch.device, on_cpu: bool) -> str | None:
    """Why the baseline cannot run here, or None."""
    for module in ("transformers", "accelerate"):
        try:
            __import__(module)
        except Exception as e:  # noqa: BLE001 - any import failure skips the baseline
            return f"{module} is not importable ({type(e).__name__}: {e})"
    if device.type != "cuda" and not on_cpu:
        return "no CUDA device: accelerate's CPU offload moves weights to a GPU for every forward pass"
    return None


def run_baseline(hf: Path, device: torch.device, budget: int, share: float, args, deadline: float, log: Log) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    name = f"hf-accelerate {share:.0%}"
    cuda = device.type == "cuda"
    max_memory: dict = {"cpu": args.hf_cpu_memory}
    if cuda:
        max_memory = {device.index or 0: budget} | max_memory
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    out: dict[str, Any] = {"kind": "hf-accelerate", "name": name, "share": share, "gpu_budget_bytes": budget,
                           "max_memory": {str(k): v for k, v in max_memory.items()}, "dtype": "float16",
                           "transformers": transformers.__version__, "accelerate": _version("accelerate")}
    _free(device)
    log(f"{name}: loading float16 with device_map=auto, max_memory {out['max_memory']}")
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf, device_map="auto", max_memory=max_memory,
                                                 **{dtype_kw: torch.float16})
    model.eval()
    out["load_s"] = round(time.perf_counter() - t, 2)
    placed: dict[str, int] = {}
    for where in getattr(model, "hf_device_map", {}).values():
        placed[str(where)] = placed.get(str(where), 0) + 1
    out["device_map_counts"] = placed
    out["device_map"] = {k: str(v) for k, v in getattr(model, "hf_device_map", {}).items()}
    out["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if cuda:
        out["gpu_allocated_after_load_bytes"] = torch.cuda.memory_allocated(device)
    log(f"{name}: loaded in {out['load_s']} s, modules per device {placed}")
    first = torch.device(device if cuda else "cpu")
    rng = random.Random(0)
    vocab = model.config.vocab_size
    eos = model.config.eos_token_id

    def generate(model, n_prompt: int, n_new: int, max_time: float | None = None) -> tuple[int, float]:
        ids = torch.tensor([[rng.randrange(vocab) for _ in range(n_prompt)]], device=first)
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            y = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                               do_sample=False, pad_token_id=eos, max_time=max_time)
        _sync(device)
        return y.shape[1] - n_prompt, time.perf_counter() - t0

    generate(model, 8, 2)  # warm-up
    ttft, prefill, decode = [], [], []
    for _ in range(args.hf_repeats):
        _, t1 = generate(model, args.prompt_tokens, 1)
        left = deadline - time.monotonic() - 15
        n, tn = generate(model, args.prompt_tokens, args.tokens, max_time=max(left, 5.0))
        ttft.append(t1)
        prefill.append(args.prompt_tokens / t1)
        decode.append((n - 1) / (tn - t1) if n > 1 and tn > t1 else None)
        out["generated_tokens"] = n
        log(f"{name}: first token {t1:.2f} s, {n} tokens in {tn:.2f} s")
    out["time_to_first_token_s"] = rounded(statistics.median(ttft))
    out["prefill_tokens_per_s"] = rounded(statistics.median(prefill), 3)
    good = [d for d in decode if d is not None]
    out["decode_tokens_per_s"] = rounded(statistics.median(good), 3) if good else None
    out["decode_tokens_per_s_runs"] = [rounded(d, 3) for d in decode]
    out["prompt_tokens"], out["decode_tokens"], out["repeats"] = args.prompt_tokens, args.tokens, args.hf_repeats
    if cuda:
        out["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        out["gpu_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    log(f"{name}: decode {out['decode_tokens_per_s']} tok/s, prefill {out['prefill_tokens_per_s']} tok/s")
    del model
    _free(device)
    return out


# -- the table ---------------------------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    m = report.get("model", {})
    print(f"model: hidden {m.get('hidden')}, expert width {m.get('inter')}, {m.get('layers')} layers, "
          f"{m.get('experts')} experts top-{m.get('top_k')}; q4 experts {gb(m.get('q4_expert_bytes'))} "
          f"({m.get('total_experts')} x {m.get('expert_chunk_bytes', 0) / 1e6:.2f} MB), float16 checkpoint "
          f"{gb(m.get('hf_float16_bytes'))}")
    h = report.get("h2d", {})
    print(f"device: {report.get('machine', {}).get('gpu_name')}; pinned h2d {h.get('chunk_pinned_gbps')} GB/s "
          f"a chunk, {h.get('bulk_pinned_gbps')} GB/s bulk")
    head = (f"{'run':28s} {'GPU budget':>10s} {'slots':>9s} {'decode':>8s} {'prefill':>8s} {'GPU hit':>7s} "
            f"{'ahead':>6s} {'on GPU':>6s} "
            f"{'RAM hit':>7s} {'h2d/tok':>9s} {'roofline':>8s} {'share':>6s} {'all-miss':>8s}")
    print(head)
    print("-" * len(head))

    def num(x: Any, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for r in report.get("runs", []):
        if "error" in r:
            print(f"{r['name']:28s} error: {r['error']}")
            continue
        plan = (r.get("memory_plan") or {}).get("gpu") or {}
        slots = f"{plan['slots']}/{m.get('total_experts')}" if plan else "-"
        rl = r.get("roofline", {})
        print(f"{r['name']:28s} {gb(r.get('gpu_budget_bytes')):>10s} {slots:>9s} "
              f"{num(r.get('decode_tokens_per_s'), '.2f'):>8s} {num(r.get('prefill_tokens_per_s'), '.1f'):>8s} "
              f"{num(r.get('gpu_hit_rate'), '.1%'):>7s} {num(r.get('gpu_prefetch_hit_rate'), '.0%'):>6s} "
              f"{num(r.get('decode_gpu_expert_share'), '.0%'):>6s} {num(r.get('ram_hit_rate'), '.1%'):>7s} "
              f"{mb(r.get('h2d_bytes_per_token')) if r.get('kind') == 'edgerun' else '-':>9s} "
              f"{num(rl.get('roofline_tokens_per_s'), '.1f'):>8s} {num(rl.get('decode_share_of_roofline'), '.0%'):>6s} "
              f"{num(rl.get('all_misses_copied_tokens_per_s'), '.1f'):>8s}")
    for s in report.get("skipped", []):
        print(f"skipped: {s}")
    print("GPU hit: decode experts in a GPU slot before the token; ahead: copied there during the token, before it "
          "was asked for; on GPU: share of decode expert calls run on the GPU.")
    print("decode/prefill in tokens/s; roofline = pinned h2d GB/s / h2d bytes per token, share = decode / roofline; "
          "all-miss = the bound if every GPU miss were copied over PCIe. The hf-accelerate runs hold float16 "
          "weights (about 3.5x the q4 bytes) in the same GPU budget in bytes.")


# -- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="write the results here as JSON")
    ap.add_argument("--device", default="cuda", help="the GPU (cuda, cuda:N), or cpu for a dry run (default cuda)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and runs (a dry run; the default with "
                                                        "--device cpu)")
    sizes = ap.add_argument_group("model (defaults: hidden 2048, expert width 5632, 16 layers, 8 experts top-2, "
                                  "16 heads, 4 KV heads; --tiny: 256, 512, 4 layers, 4/2 heads)")
    for key, flag in (("hidden", "--hidden"), ("inter", "--inter"), ("layers", "--layers"), ("experts", "--experts"),
                      ("top_k", "--top-k"), ("heads", "--heads"), ("kv_heads", "--kv-heads"), ("vocab", "--vocab")):
        sizes.add_argument(flag, dest=key, type=int, default=None)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5],
                    help="GPU expert slots as shares of all experts (default 0.25 0.5); the budget adds the dense "
                         "weights, KV cache and scratch")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prefill length (default 128; --tiny 32)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens to decode (default 64; --tiny 16)")
    ap.add_argument("--repeats", type=int, default=None, help="edgerun runs per setting, median (default 3; --tiny 2)")
    ap.add_argument("--temp", type=float, default=1.0, help="edgerun's sampling temperature, seeded (default 1, as "
                                                            "edgerun bench); the baseline decodes greedily")
    ap.add_argument("--context", type=int, default=None, help="KV cache tokens (default: prompt + tokens + 16, at "
                                                              "least 256)")
    ap.add_argument("--ram", default=None, help="edgerun's RAM budget, e.g. 2GiB (default: what the machine has, "
                                                "which holds every expert of the default model)")
    ap.add_argument("--warm", action="store_true", help="do not drop the store from the page cache before a load")
    ap.add_argument("--skip-variants", action="store_true", help="no misses=copy / misses=cpu runs")
    ap.add_argument("--skip-baseline", action="store_true", help="no transformers + accelerate baseline")
    ap.add_argument("--baseline-on-cpu", action="store_true",
                    help="run the baseline's code path on the CPU too (no offload: checks the script, not a figure)")
    ap.add_argument("--hf-cpu-memory", default="100GiB", help="accelerate's max_memory for the CPU (default 100GiB)")
    ap.add_argument("--hf-repeats", type=int, default=1, help="baseline runs per budget (default 1)")
    ap.add_argument("--time-limit", type=float, default=480,
                    help="seconds: optional steps (variants, further baseline budgets) start only while the "
                         "estimated end stays under this (default 480)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint and store go, kept and reused by later runs (default: a temporary "
                         "directory, removed at the end)")
    args = ap.parse_args(argv)

    log = Log()
    deadline = time.monotonic() + args.time_limit
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device; pass --device cpu --tiny for a dry run")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"--device must be cuda, cuda:N or cpu, got {args.device}")
    tiny = args.tiny or device.type == "cpu"
    base = TINY if tiny else DEFAULTS
    sz = {k: getattr(args, k) if getattr(args, k, None) is not None else base[k]
          for k in ("hidden", "inter", "layers", "experts", "top_k", "heads", "kv_heads", "vocab")}
    for k in ("prompt_tokens", "tokens", "repeats"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    args.context = args.context or max(256, args.prompt_tokens + args.tokens + 16)

    temp = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="edgerun-gpu-tier-")) if temp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, {"benchmark": "gpu_tier", "args": {k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in vars(args).items()},
                               "tiny": tiny, "machine": machine_info(device, workdir), "runs": [], "skipped": [],
                               "notes": []})
    d = report.data
    d["notes"].append("hf-accelerate runs hold float16 weights (about 3.5x the q4 bytes) and get the same GPU budget "
                      "in bytes as the edgerun run of the same share")
    if device.type == "cpu":
        d["notes"].append("dry run: the CPU stands in for the GPU; copies are RAM to RAM, so the roofline figures "
                          "mean nothing")
    if d["machine"]["workdir_fs"] in ("tmpfs", "ramfs"):
        d["notes"].append(f"the workdir is on {d['machine']['workdir_fs']}: the store stays in memory, so the cold "
                          f"loads are not cold; pass --workdir on a disk")
        print(f"warning: {d['notes'][-1]}", file=sys.stderr)
    report.save(log)
    log(f"device {d['machine']['gpu_name']}, torch {torch.__version__}, {os.cpu_count()} CPUs; workdir {workdir} "
        f"({d['machine']['workdir_fs']})")
    try:
        hf, store, made = make_model(sz, workdir, log)
        layout = store_layout(store)
        chunk = layout.chunk_bytes
        n_moe = len(layout.spec.moe_layers)
        hf_bytes = json.loads((hf / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        d["model"] = sz | made | {
            "expert_chunk_bytes": chunk, "total_experts": layout.total_experts,
            "q4_expert_bytes": layout.total_experts * chunk, "dense_device_bytes": layout.device_resident_bytes,
            "store_bytes": _dir_bytes(store), "hf_float16_bytes": hf_bytes,  # the bf16 checkpoint's, 2 bytes each
            "hf_float16_over_store": round(hf_bytes / _dir_bytes(store), 2),
            "expert_bytes_per_token": layout.experts_per_token * n_moe * chunk, "context_length": args.context}
        report.save(log)

        from edgerun.hw.settings import local_profile

        t = time.perf_counter()
        profile, source = local_profile(measure=True)
        d["profile"] = {"source": source, "measured_s": round(time.perf_counter() - t, 2),
                        "gpu": profile.get("gpu") if profile else None}
        log(f"edgerun profile: {source} ({d['profile']['measured_s']} s)")
        d["h2d"] = measure_copies(device, chunk, log)
        h2d = d["h2d"]["chunk_pinned_gbps"]
        report.save(log)

        budgets = {}
        for share in args.shares:
            budgets[share], plan = gpu_budget(layout, share, device, args.context)
            log(f"share {share:.0%}: GPU budget {gb(budgets[share])} for {plan['slots']} of {layout.total_experts} "
                f"expert slots")

        def edgerun_run(share: float, misses: str) -> dict:
            try:
                r = run_edgerun(store, device, budgets[share], share, misses, args, log)
                r["roofline"] = roofline(r, h2d, d["model"]["expert_bytes_per_token"])
            except Exception as e:  # noqa: BLE001 - recorded; the other runs go on
                log(f"edgerun {share:.0%} misses={misses} failed: {type(e).__name__}: {e}")
                r = {"kind": "edgerun", "name": f"edgerun {share:.0%} misses={misses}", "share": share,
                     "misses": misses, "gpu_budget_bytes": budgets[share], "error": f"{type(e).__name__}: {e}"}
                _free(device)
            d["runs"].append(r)
            report.save(log)
            return r

        def baseline_run(share: float) -> dict:
            try:
                r = run_baseline(hf, device, budgets[share], share, args, deadline, log)
            except Exception as e:  # noqa: BLE001 - recorded; the other runs go on
                log(f"hf-accelerate {share:.0%} failed: {type(e).__name__}: {e}")
                r = {"kind": "hf-accelerate", "name": f"hf-accelerate {share:.0%}", "share": share,
                     "gpu_budget_bytes": budgets[share], "error": f"{type(e).__name__}: {e}"}
                _free(device)
            d["runs"].append(r)
            report.save(log)
            return r

        def time_left() -> float:
            return deadline - time.monotonic()

        def skip(what: str, why: str) -> None:
            log(f"skipping {what}: {why}")
            d["skipped"].append(f"{what}: {why}")
            report.save(log)

        durations: dict[str, float] = {}
        for share in args.shares:
            t = time.perf_counter()
            edgerun_run(share, "auto")
            durations.setdefault("edgerun", time.perf_counter() - t)

        missing = None if not args.skip_baseline else "--skip-baseline"
        missing = missing or baseline_missing(device, args.baseline_on_cpu)
        first, *others = args.shares
        if missing:
            skip("hf-accelerate baseline", missing)
        else:
            t = time.perf_counter()
            baseline_run(first)
            durations["baseline"] = time.perf_counter() - t

        for misses in ("copy", "cpu"):
            what = f"edgerun {first:.0%} misses={misses}"
            if args.skip_variants:
                skip(what, "--skip-variants")
            elif time_left() < 1.2 * durations["edgerun"]:
                skip(what, f"time limit ({time_left():.0f} s left, a run took {durations['edgerun']:.0f} s)")
            else:
                edgerun_run(first, misses)

        for share in others if not missing else []:
            if time_left() < 1.2 * durations["baseline"]:
                skip(f"hf-accelerate {share:.0%}", f"time limit ({time_left():.0f} s left, the first baseline "
                                                   f"took {durations['baseline']:.0f} s)")
            else:
                baseline_run(share)
    except BaseException as e:
        d["error"] = f"{type(e).__name__}: {e}"
        report.save(log)
        raise
    finally:
        if temp:
            shutil.rmtree(workdir, ignore_errors=True)
    report.save(log)
    log(f"done; results in {args.out}")
    print_table(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
