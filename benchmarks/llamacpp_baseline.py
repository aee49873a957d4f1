"""llama.cpp baseline for the offloading benchmarks: decode speed of the same model under memory limits.

Three subcommands:

``convert HF_DIR OUT.gguf``
    Writes a Q4_0 GGUF of a Mixtral-architecture Hugging Face checkpoint (sharded or single
    safetensors, bf16/fp16/fp32, per-expert ``w1/w2/w3`` tensors and a SentencePiece
    ``tokenizer.model``) with the ``gguf`` package: llama architecture, experts stacked into
    ``ffn_{gate,up,down}_exps``, q/k rows permuted from the HF rotary layout to GGUF's, norms and
    router in F32, every other matrix Q4_0 except ``output.weight`` (Q8_0 by default; llama.cpp's
    own Q4_0 files use Q6_K there, which the ``gguf`` package cannot write).

``bench MODEL.gguf``
    Loads the GGUF with llama-cpp-python's low-level API (so that every ``llama_model_params`` field
    can be set), evaluates a short prompt in one batch, then decodes greedily one token at a time,
    ignoring end-of-sequence, and reports prompt and decode tokens per second, load time and peak RSS.
    ``--mode`` picks the loading settings:

    * ``default``: mmap, ``use_extra_bufts=True`` (weights llama.cpp can repack for the CPU are
      copied into anonymous memory at load),
    * ``no-repack``: mmap, ``use_extra_bufts=False`` (weights are computed on straight from the
      mapping, so the page cache holds them and can evict them),
    * ``lazy``: like ``no-repack`` plus ``lazy_mode=LLAMA_LAZY_MODE_ON`` (on-demand row reading;
      it only applies to tensors the architecture marks, so see ``lazy_tensors`` in the output),
    * ``direct-io``: ``load_mode=LLAMA_LOAD_MODE_DIRECT_IO`` (no mapping; the weights are read into
      memory with direct I/O).

``run MODEL.gguf``
    Runs ``bench`` in a child process inside a cgroup v1 memory cgroup, for every combination of
    ``--modes`` and ``--limits``, ``--repeat`` times each, optionally dropping the GGUF from the page
    cache first (``--cold``). The page cache of a mapped file is charged to the cgroup, so with a
    limit below the file size llama.cpp has to read weights from disk again. Runs during which other
    processes used a noticeable share of the CPUs are repeated and left out of the medians. Needs
    root.

Examples::

    python benchmarks/llamacpp_baseline.py convert path/to/hf-model model-q4_0.gguf
    python benchmarks/llamacpp_baseline.py bench model-q4_0.gguf --mode no-repack
    sudo python benchmarks/llamacpp_baseline.py run model-q4_0.gguf --cold --wait-idle 0.9 \\
        --modes default direct-io no-repack lazy --limits 0.75G 1.25G 2.5G none --repeat 3
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("default", "no-repack", "lazy", "direct-io")
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the old disk spins and the small "
               "computer thinks about experts, caches and prefetching. ")


# --------------------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------------------

_ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


class SafetensorsDir:
    """Read-only access to the tensors of a HF safetensors checkpoint directory, as float32."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}
        for f in sorted(root.glob("*.safetensors")):
            with open(f, "rb") as fp:
                n = int.from_bytes(fp.read(8), "little")
                header = json.loads(fp.read(n))
            base = 8 + n
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                beg, end = meta["data_offsets"]
                self.entries[name] = (f, meta["dtype"], meta["shape"], base + beg, end - beg)
        if not self.entries:
            raise SystemExit(f"no safetensors files in {root}")

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][2])

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a C-contiguous float32 array."""
        path, dtype, shape, offset, nbytes = self.entries[name]
        if dtype not in _ST_DTYPES:
            raise SystemExit(f"unsupported dtype {dtype} of {name}")
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        raw = np.fromfile(path, dtype=np_dtype, count=nbytes // np_dtype.itemsize, offset=offset)
        if dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)
        return out.reshape(shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q/k projection from HF's rotate-half layout to GGUF's interleaved one.

    HF keeps the two halves of each head's rotary pairs in separate blocks of rows; llama.cpp's
    llama architecture expects the pair members in adjacent rows.
    """
    rows = w.shape[0]
    head_dim = rows // n_head
    return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])
             .swapaxes(1, 2)
             .reshape(w.shape))


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]


def _quantized_nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * type_size


def convert(hf_dir: Path, out: Path, output_type: str, embd_type: str, weight_type: str = "q4_0") -> None:
    """Write a llama-architecture MoE GGUF of the Mixtral checkpoint in ``hf_dir``.

    ``weight_type`` is the type of the attention and expert matrices (Q4_0 for the baseline; Q8_0
    gives a nearly lossless file for checking the conversion against a reference implementation).
    """
    import gguf
    from gguf.vocab import SentencePieceVocab

    Q = gguf.GGMLQuantizationType
    qtypes = {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0, "f16": Q.F16, "f32": Q.F32}
    cfg = json.loads((hf_dir / "config.json").read_text())
    st = SafetensorsDir(hf_dir)
    W = qtypes[weight_type]
    n_layer = cfg["num_hidden_layers"]
    n_embd = cfg["hidden_size"]
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads", n_head)
    n_expert = cfg["num_local_experts"]
    n_ff = cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or n_embd // n_head

    def quantize(arr: np.ndarray, qtype: Any) -> np.ndarray:
        if qtype == Q.F32:
            return np.ascontiguousarray(arr, dtype=np.float32)
        if qtype == Q.F16:
            return np.ascontiguousarray(arr, dtype=np.float16)
        return gguf.quants.quantize(arr, qtype)

    def experts(layer: int, which: str) -> Callable[[], np.ndarray]:
        # Quantized one expert at a time so that only one expert is ever held in float32.
        def make() -> np.ndarray:
            parts = [quantize(st.get(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{which}.weight"),
                              W) for e in range(n_expert)]
            return np.stack(parts)
        return make

    def plain(name: str, fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Callable[[], np.ndarray]:
        return lambda: st.get(name) if fn is None else fn(st.get(name))

    plan: list[_Planned] = []

    def add(name: str, src_shape: list[int], qtype: Any, make: Callable[[], np.ndarray],
            prequantized: bool = False) -> None:
        plan.append(_Planned(name, tuple(src_shape), qtype,
                             make if prequantized else (lambda m=make, q=qtype: quantize(m(), q))))

    add("token_embd.weight", st.shape("model.embed_tokens.weight"), qtypes[embd_type],
        plain("model.embed_tokens.weight"))
    for i in range(n_layer):
        p = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", st.shape(f"{p}.input_layernorm.weight"), Q.F32,
            plain(f"{p}.input_layernorm.weight"))
        add(f"blk.{i}.attn_q.weight", st.shape(f"{p}.self_attn.q_proj.weight"), W,
            plain(f"{p}.self_attn.q_proj.weight", lambda w: permute_rotary(w, n_head)))
        add(f"blk.{i}.attn_k.weight", st.shape(f"{p}.self_attn.k_proj.weight"), W,
            plain(f"{p}.self_attn.k_proj.weight", lambda w: permute_rotary(w, n_head_kv)))
        add(f"blk.{i}.attn_v.weight", st.shape(f"{p}.self_attn.v_proj.weight"), W,
            plain(f"{p}.self_attn.v_proj.weight"))
        add(f"blk.{i}.attn_output.weight", st.shape(f"{p}.self_attn.o_proj.weight"), W,
            plain(f"{p}.self_attn.o_proj.weight"))
        add(f"blk.{i}.ffn_norm.weight", st.shape(f"{p}.post_attention_layernorm.weight"), Q.F32,
            plain(f"{p}.post_attention_layernorm.weight"))
        add(f"blk.{i}.ffn_gate_inp.weight", st.shape(f"{p}.block_sparse_moe.gate.weight"), Q.F32,
            plain(f"{p}.block_sparse_moe.gate.weight"))
        add(f"blk.{i}.ffn_gate_exps.weight", [n_expert, n_ff, n_embd], W, experts(i, "w1"), True)
        add(f"blk.{i}.ffn_up_exps.weight", [n_expert, n_ff, n_embd], W, experts(i, "w3"), True)
        add(f"blk.{i}.ffn_down_exps.weight", [n_expert, n_embd, n_ff], W, experts(i, "w2"), True)
    add("output_norm.weight", st.shape("model.norm.weight"), Q.F32, plain("model.norm.weight"))
    add("output.weight", st.shape("lm_head.weight"), qtypes[output_type], plain("lm_head.weight"))

    w = gguf.GGUFWriter(out, "llama")
    w.add_name(hf_dir.name)
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_expert_count(n_expert)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if W == Q.Q4_0 else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    vocab = SentencePieceVocab(hf_dir)
    tokens, scores, types = zip(*vocab.all_tokens())
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    sp = vocab.sentencepiece_tokenizer
    w.add_bos_token_id(cfg.get("bos_token_id", sp.bos_id()))
    w.add_eos_token_id(cfg.get("eos_token_id", sp.eos_id()))
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    for t in plan:
        nbytes = _quantized_nbytes(t.shape, t.qtype)
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for k, t in enumerate(plan, 1):
        w.write_tensor_data(t.make())
        if k % 10 == 0 or k == len(plan):
            print(f"\r{k}/{len(plan)} tensors, {time.perf_counter() - t0:.0f} s", end="", file=sys.stderr,
                  flush=True)
    print(file=sys.stderr)
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e9:.3f} GB)")


# --------------------------------------------------------------------------------------------------
# benchmark (runs in the measured process)
# --------------------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    """What one ``bench`` run measured."""

    mode: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    load_s: float
    prompt_s: float
    prompt_tok_s: float
    decode_tok_s: float  # gen_tokens / total decode time
    decode_median_tok_s: float  # 1 / median per-token time
    decode_cpu_util: float  # process CPU seconds / wall seconds while decoding (threads busy)
    decode_major_faults: int  # page faults that had to read from disk while decoding
    peak_rss_mb: float  # getrusage ru_maxrss: anonymous plus mapped file pages
    rss_anon_mb: float  # at the end, from /proc/self/status
    rss_file_mb: float
    lazy_tensors: int  # tensors llama.cpp reported as read on demand
    repack_mb: float  # size of the CPU_REPACK weight buffer, 0 when weights are not repacked
    tokens: list[int] = field(default_factory=list)


def _proc_status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _phase(name: str) -> None:
    """Progress marker on stdout, so that the parent knows where a killed child was."""
    print(f"phase {name}", flush=True)


def bench(model: Path, mode: str, threads: int, n_prompt: int, n_gen: int, verbose: bool) -> BenchResult:
    """Load ``model`` with the settings of ``mode``, evaluate a prompt and decode ``n_gen`` tokens."""
    import llama_cpp as L

    log_lines: list[str] = []

    @L.llama_log_callback
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        s = text.decode("utf-8", "replace")
        log_lines.append(s)
        if verbose:
            sys.stderr.write(s)

    L.llama_log_set(on_log, ctypes.c_void_p(0))
    L.llama_backend_init()

    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.load_mode = L.LLAMA_LOAD_MODE_DIRECT_IO if mode == "direct-io" else L.LLAMA_LOAD_MODE_MMAP
    mp.use_extra_bufts = mode in ("default", "direct-io")
    mp.lazy_mode = L.LLAMA_LAZY_MODE_ON if mode == "lazy" else L.LLAMA_LAZY_MODE_OFF

    cp = L.llama_context_default_params()
    cp.n_ctx = 256 * ((n_prompt + n_gen + 8 + 255) // 256)
    cp.n_batch = max(n_prompt, 32)
    cp.n_ubatch = max(n_prompt, 32)
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.no_perf = True

    _phase("load")
    t0 = time.perf_counter()
    mdl = L.llama_model_load_from_file(str(model).encode(), mp)
    if not mdl:
        raise SystemExit("llama.cpp could not load the model:\n" + "".join(log_lines[-20:]))
    ctx = L.llama_init_from_model(mdl, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context:\n" + "".join(log_lines[-20:]))
    load_s = time.perf_counter() - t0

    vocab = L.llama_model_get_vocab(mdl)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    text = (PROMPT_TEXT * (1 + n_prompt // 8)).encode()
    buf = (L.llama_token * (len(text) + 16))()
    n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    if n < n_prompt:
        raise SystemExit(f"prompt tokenized to {n} tokens, fewer than {n_prompt}")
    prompt = (L.llama_token * n_prompt)(*buf[:n_prompt])

    def next_token() -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    _phase("prompt")
    t0 = time.perf_counter()
    if L.llama_decode(ctx, L.llama_batch_get_one(prompt, n_prompt)) != 0:
        raise SystemExit("llama_decode failed on the prompt")
    tok = next_token()
    prompt_s = time.perf_counter() - t0

    _phase("decode")
    out = [tok]
    step = (L.llama_token * 1)()
    times: list[float] = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = time.process_time()
    for _ in range(n_gen):
        step[0] = tok
        t0 = time.perf_counter()
        if L.llama_decode(ctx, L.llama_batch_get_one(step, 1)) != 0:
            raise SystemExit("llama_decode failed")
        tok = next_token()
        times.append(time.perf_counter() - t0)
        out.append(tok)
    decode_cpu = time.process_time() - cpu0
    majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - ru0.ru_majflt

    log = "".join(log_lines)
    repack_mb = 0.0
    for line in log.splitlines():
        if "CPU_REPACK" in line and "MiB" in line:
            try:
                repack_mb += float(line.split("=")[-1].split("MiB")[0])
            except ValueError:
                pass
    result = BenchResult(
        mode=mode, threads=threads, prompt_tokens=n_prompt, gen_tokens=n_gen,
        load_s=round(load_s, 3), prompt_s=round(prompt_s, 3),
        prompt_tok_s=round(n_prompt / prompt_s, 3),
        decode_tok_s=round(n_gen / sum(times), 3),
        decode_median_tok_s=round(1 / statistics.median(times), 3),
        decode_cpu_util=round(decode_cpu / sum(times), 2),
        decode_major_faults=majflt,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        rss_anon_mb=round(_proc_status_mb("RssAnon"), 1),
        rss_file_mb=round(_proc_status_mb("RssFile"), 1),
        lazy_tensors=log.count("lazy read enabled"),
        repack_mb=repack_mb,
        tokens=out[:16],
    )
    L.llama_free(ctx)
    L.llama_model_free(mdl)
    return result


# --------------------------------------------------------------------------------------------------
# runner: page cache, cgroup, child processes
# --------------------------------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def parse_size(s: str) -> int | None:
    """'0.75G', '1280M', '2.5GiB', '123456' -> bytes (binary units); 'none' -> None."""
    t = s.strip().lower().removesuffix("ib").removesuffix("b")
    if t in ("none", "unlimited", "0"):
        return None
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if t[-1:] in "kmg" else t) * mult)


def _cpu_times() -> tuple[int, int]:
    """(idle + iowait jiffies, total jiffies) of the whole machine, from /proc/stat."""
    vals = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return vals[3] + vals[4], sum(vals[:8])


def wait_for_idle(min_idle: float, max_wait: float) -> float:
    """Wait until the machine's CPUs were at least ``min_idle`` idle for 3 s in a row.

    Other processes competing for the cores distort the decode timings badly (llama.cpp's threads
    spin at barriers, so a thread that loses its core stalls the others). Returns the idle fraction
    of the last second waited; gives up after ``max_wait`` seconds.
    """
    deadline = time.monotonic() + max_wait
    quiet = 0
    idle = 0.0
    while True:
        i0, t0 = _cpu_times()
        time.sleep(1.0)
        i1, t1 = _cpu_times()
        idle = (i1 - i0) / max(t1 - t0, 1)
        quiet = quiet + 1 if idle >= min_idle else 0
        if quiet >= 3 or time.monotonic() > deadline:
            return idle


def drop_file_cache(path: Path) -> float:
    """Evict ``path`` from the page cache; returns the fraction still resident afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from disk_read import drop_cache, resident_fraction

    drop_cache([path])
    return resident_fraction([path])


class MemoryCgroup:
    """A cgroup v1 memory cgroup with an optional hard limit."""

    def __init__(self, name: str, limit: int | None) -> None:
        if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
            raise SystemExit(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
        self.path = CGROUP_ROOT / name
        self.path.mkdir(exist_ok=True)
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)  # the killed child may still be exiting

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` behind a shell that moves itself into the cgroup, then execs ``cmd``."""
        procs = self.path / "cgroup.procs"
        return ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd]

    def read(self, key: str) -> str:
        return (self.path / key).read_text()

    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0


@dataclass
class RunResult:
    """One child run under one memory limit."""

    mode: str
    limit_bytes: int | None
    status: str  # "ok", "oom-killed", "timeout" or "failed (...)"
    last_phase: str
    cached_before: float  # page-cache fraction of the GGUF at the start
    loadavg_before: float  # 1-minute load average of the machine when the run started
    idle_before: float  # idle fraction of the CPUs in the second before the run (with --wait-idle)
    foreign_cpu: float  # share of the machine's CPU time used by other processes during the run
    wall_s: float
    cgroup_peak_mb: float  # memory.max_usage_in_bytes: anonymous memory plus charged page cache
    bench: dict[str, Any] | None


def run_one(model: Path, mode: str, limit: int | None, cold: bool, args: argparse.Namespace) -> RunResult:
    """Run ``bench`` in a child inside a fresh memory cgroup and collect its outcome."""
    idle = wait_for_idle(args.wait_idle, args.max_wait) if args.wait_idle > 0 else -1.0
    cached = drop_file_cache(model) if cold else -1.0
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "bench", str(model), "--mode", mode,
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--gen-tokens", str(args.gen_tokens), "--json"]
    cg = MemoryCgroup(f"llamacpp-bench-{os.getpid()}", limit)
    try:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            idle0, total0 = _cpu_times()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cg.wrap(cmd), stdout=out, stderr=err, text=True, start_new_session=True)
            timed_out = threading.Event()

            def kill() -> None:
                timed_out.set()
                os.killpg(proc.pid, signal.SIGKILL)

            timer = threading.Timer(args.timeout, kill)
            timer.start()
            _, wstatus, usage = os.wait4(proc.pid, 0)
            timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(wstatus)
            wall = time.perf_counter() - t0
            idle1, total1 = _cpu_times()
            peak = int(cg.read("memory.max_usage_in_bytes")) / 2**20
            oom = cg.oom_kills()
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
    finally:
        cg.remove()
    # CPU time that other processes used while the child ran, as a fraction of the machine
    busy = ((total1 - total0) - (idle1 - idle0)) / os.sysconf("SC_CLK_TCK")
    foreign = max(0.0, busy - usage.ru_utime - usage.ru_stime) / (wall * (os.cpu_count() or 1))
    lines = stdout.strip().splitlines()
    phases = [ln.split()[1] for ln in lines if ln.startswith("phase ")]
    data: dict[str, Any] | None = None
    if lines and lines[-1].startswith("{"):
        data = json.loads(lines[-1])
    if timed_out.is_set():
        status = "timeout"
    elif oom or proc.returncode == -signal.SIGKILL:
        status = "oom-killed"
    elif proc.returncode != 0 or data is None:
        status = f"failed (rc {proc.returncode}): {stderr.strip().splitlines()[-1:]}"
    else:
        status = "ok"
    return RunResult(mode, limit, status, phases[-1] if phases else "", round(cached, 4),
                     round(load_before, 2), round(idle, 3), round(foreign, 3), round(wall, 1),
                     round(peak, 1), data)


def _fmt_limit(limit: int | None) -> str:
    return "none" if limit is None else f"{limit / 2**30:.2f} GiB"


def summarize(runs: list[RunResult], max_foreign: float) -> list[dict[str, Any]]:
    """Median over the repeats of each (mode, limit), leaving out runs other processes disturbed.

    When every successful run of a cell was disturbed, the medians use them anyway and
    ``contended`` says so.
    """
    groups: dict[tuple[str, int | None], list[RunResult]] = {}
    for r in runs:
        groups.setdefault((r.mode, r.limit_bytes), []).append(r)
    rows = []
    for (mode, limit), rs in groups.items():
        ok_runs = [r for r in rs if r.status == "ok" and r.bench]
        clean = [r for r in ok_runs if r.foreign_cpu <= max_foreign]
        used = clean or ok_runs
        ok = [r.bench for r in used if r.bench]

        def med(key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            return round(statistics.median(b[key] for b in ok), 3) if ok else None

        rows.append({
            "mode": mode, "limit": _fmt_limit(limit), "runs": len(rs), "ok": len(ok_runs),
            "used": len(ok), "contended": bool(ok_runs) and not clean,
            "status": sorted({r.status for r in rs}),
            "killed_in": sorted({r.last_phase for r in rs if r.status != "ok"}),
            "decode_tok_s": med("decode_tok_s"), "decode_median_tok_s": med("decode_median_tok_s"),
            "decode_runs": [b["decode_tok_s"] for b in ok],
            "prompt_tok_s": med("prompt_tok_s"), "load_s": med("load_s"),
            "decode_cpu_util": med("decode_cpu_util"), "decode_major_faults": med("decode_major_faults"),
            "peak_rss_mb": med("peak_rss_mb"), "rss_anon_mb": med("rss_anon_mb"),
            "cgroup_peak_mb": round(statistics.median(r.cgroup_peak_mb for r in (used or rs)), 1),
        })
    return rows


def run_matrix(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise SystemExit("run needs root to create memory cgroups")
    model = Path(args.model)
    limits = [parse_size(s) for s in args.limits]
    if not args.cold and any(limit is not None for limit in limits):
        print("warning: without --cold, pages of the GGUF already cached are charged to whichever "
              "cgroup read them first, not to the limited one, so the limit barely applies",
              file=sys.stderr)
    runs: list[RunResult] = []
    for mode in args.modes:
        for limit in limits:
            clean = attempts = 0
            while clean < args.repeat and attempts < args.repeat + args.retries:
                attempts += 1
                r = run_one(model, mode, limit, args.cold, args)
                runs.append(r)
                if args.jsonl:
                    with open(args.jsonl, "a") as fp:
                        fp.write(json.dumps(asdict(r)) + "\n")
                b = r.bench or {}
                disturbed = r.foreign_cpu > args.max_foreign
                print(f"{mode:9s} limit {_fmt_limit(limit):>9s} run {attempts}: {r.status:10s} "
                      f"decode {b.get('decode_tok_s', '-')} tok/s, prompt {b.get('prompt_tok_s', '-')} "
                      f"tok/s, load {b.get('load_s', '-')} s, peak RSS {b.get('peak_rss_mb', '-')} MB, "
                      f"cgroup peak {r.cgroup_peak_mb} MB, decode CPU {b.get('decode_cpu_util', '-')}, "
                      f"major faults {b.get('decode_major_faults', '-')}, other processes' CPU "
                      f"{r.foreign_cpu:.0%}{' (disturbed)' if disturbed else ''}, {r.wall_s} s"
                      + (f", died in {r.last_phase}" if r.status != "ok" else ""),
                      file=sys.stderr, flush=True)
                if r.status != "ok":
                    if args.skip_after_failure:
                        break  # a limit that kills once kills every time
                    clean += 1
                elif not disturbed:
                    clean += 1
    rows = summarize(runs, args.max_foreign)
    if args.json:
        print(json.dumps({"model": str(model), "model_bytes": model.stat().st_size, "cold": args.cold,
                          "gen_tokens": args.gen_tokens, "prompt_tokens": args.prompt_tokens,
                          "threads": args.threads, "summary": rows,
                          "runs": [asdict(r) for r in runs]}, indent=2))
    else:
        print(f"{'mode':10s} {'limit':>9s} {'decode tok/s':>12s} {'prompt tok/s':>12s} {'load s':>7s} "
              f"{'peak RSS MB':>11s} {'cgroup MB':>9s}  status")
        for row in rows:
            print(f"{row['mode']:10s} {row['limit']:>9s} {row['decode_tok_s'] or '-':>12} "
                  f"{row['prompt_tok_s'] or '-':>12} {row['load_s'] or '-':>7} "
                  f"{row['peak_rss_mb'] or '-':>11} {row['cgroup_peak_mb']:>9}  "
                  f"{','.join(row['status'])} ({row['ok']}/{row['runs']} ok, {row['used']} used"
                  f"{', all disturbed' if row['contended'] else ''})")
    return 0


# --------------------------------------------------------------------------------------------------

def _bench_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF Mixtral checkpoint -> Q4_0 GGUF")
    c.add_argument("hf_dir", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--output-type", choices=["q4_0", "q8_0", "f16"], default="q8_0",
                   help="type of output.weight (default q8_0)")
    c.add_argument("--weight-type", choices=["q4_0", "q8_0"], default="q4_0",
                   help="type of the attention and expert matrices (default q4_0; q8_0 is for "
                        "checking the conversion against a reference)")
    c.add_argument("--embd-type", choices=["q4_0", "q8_0", "f16"], default="q4_0",
                   help="type of token_embd.weight (default q4_0, as llama.cpp's Q4_0)")

    b = sub.add_parser("bench", help="decode benchmark in this process")
    b.add_argument("model", type=Path)
    b.add_argument("--mode", choices=MODES, default="default")
    _bench_args(b)
    b.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    b.add_argument("--json", action="store_true")

    r = sub.add_parser("run", help="bench in child processes under cgroup memory limits")
    r.add_argument("model", type=Path)
    r.add_argument("--modes", nargs="+", choices=MODES, default=["default", "no-repack"])
    r.add_argument("--limits", nargs="+", default=["0.75G", "1.25G", "2.5G", "none"],
                   help="memory limits (binary units: 0.75G = 0.75 GiB), 'none' for no limit")
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--cold", action="store_true", help="drop the GGUF from the page cache before each run (needed for the "
                        "limits to mean anything: cached pages stay charged to the cgroup that read them)")
    r.add_argument("--timeout", type=float, default=300, help="seconds before a run is killed")
    r.add_argument("--wait-idle", type=float, default=0.0, metavar="FRACTION",
                   help="before each run, wait until the CPUs are at least this idle (e.g. 0.9) "
                        "for 3 s; 0 = do not wait (default)")
    r.add_argument("--max-wait", type=float, default=900, help="give up waiting for idle after this (s)")
    r.add_argument("--max-foreign", type=float, default=0.1, metavar="FRACTION",
                   help="a run during which other processes used more than this share of the "
                        "machine's CPU time counts as disturbed: it is repeated (see --retries) and "
                        "left out of the medians when undisturbed runs exist (default 0.1)")
    r.add_argument("--retries", type=int, default=3,
                   help="extra runs allowed per (mode, limit) to replace disturbed ones (default 3)")
    r.add_argument("--skip-after-failure", action="store_true",
                   help="do not repeat a (mode, limit) whose first run failed")
    _bench_args(r)
    r.add_argument("--jsonl", type=Path, help="also append every run to this file as it finishes")
    r.add_argument("--json", action="store_true")

    args = ap.parse_args(argv)
    if args.cmd == "convert":
        convert(args.hf_dir, args.out, args.output_type, args.embd_type, args.weight_type)
    elif args.cmd == "bench":
        res = bench(args.model, args.mode, args.threads, args.prompt_tokens, args.gen_tokens, args.verbose)
        if args.json:
            print(json.dumps(asdict(res)), flush=True)
        else:
            for k, v in asdict(res).items():
                print(f"{k:20s} {v}")
    else:
        return run_matrix(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
