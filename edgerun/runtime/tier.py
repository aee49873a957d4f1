"""The device tier: a cache of expert slots in GPU memory (or in any torch device's) in front of the RAM tier.

Each MoE layer call sorts the experts it needs three ways: those in a device slot run there (batched); for each
of the others, `MissCosts` decides from the machine's rates and the tokens routed to it whether copying it over
(then computing it on the device) beats computing it on the CPU from RAM, where the RAM tier (a `RoutedExperts`:
the memory-mapped store, or the offloading cache that reads from it; see its "tier in front" methods) has it or
reads it. Copies go through pinned staging buffers on a copy stream (`Copier`), ordered against compute with
events. In decode, the next layer's router, applied to this layer's input, names the experts to copy ahead from
RAM (the RAM tier reads further ahead from the disk). With a CPU device standing in for the GPU (no pinned memory,
no streams), the same code runs in tests.

Shapes: T = tokens in the call, D = hidden, K = experts per token.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..store.layout import ExpertLayout
from .device import ExpertKernel
from .experts import Lookahead, Phase, Residency, RoutedExperts
from .placement import STAGING_CHUNKS
from .policy import ExpertCache, make_policy

MISSES = ("auto", "copy", "cpu")


@dataclass(frozen=True)
class MissCosts:
    """Seconds to run an expert missing from the device, either way. Rates in bytes/s and FLOP/s: host-to-device
    copies, the CPU kernels one token at a time (GEMV, bound by the chunk's bytes) and many (GEMM, by FLOPs), and
    the device's kernels alike."""

    chunk_bytes: int
    flops_per_token: float  # 2 x 3 x D x I
    h2d: float
    cpu_gemv: float
    cpu_gemm: float
    gpu_gemv: float
    gpu_gemm: float

    def cpu(self, tokens: int) -> float:
        return max(self.chunk_bytes / self.cpu_gemv, tokens * self.flops_per_token / self.cpu_gemm)

    def copy(self, tokens: int) -> float:
        return self.chunk_bytes / self.h2d + max(self.chunk_bytes / self.gpu_gemv,
                                                 tokens * self.flops_per_token / self.gpu_gemm)

    def copy_wins(self, tokens: int) -> bool:
        return self.copy(tokens) < self.cpu(tokens)


class Copy:
    """One chunk on its way to a device slot."""

    def __init__(self, src: np.ndarray, dst: torch.Tensor, after):
        self.src, self.dst, self.after = src, dst, after
        self.event = None  # CUDA: recorded on the copy stream once the transfer is queued
        self.error: BaseException | None = None
        self.queued = threading.Event()  # the source has been read; the transfer is queued (or done)


class Copier:
    """Copies chunks from RAM into device slots on a thread of its own. On CUDA: RAM -> a pinned staging buffer ->
    the slot, on a copy stream that first waits for the compute already queued (which may still read the slot's
    previous expert); the compute stream waits on the copy's event, never the host. Elsewhere: a plain copy."""

    def __init__(self, device: torch.device, chunk_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.staging = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True)
                        for _ in range(STAGING_CHUNKS)] if self.cuda else []
        self._staging_done: list = [None] * len(self.staging)  # event of the last transfer out of each
        self._next = 0
        self.bytes = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="edgerun-copier", daemon=True)
        self._thread.start()

    def submit(self, src: np.ndarray, dst: torch.Tensor) -> Copy:
        after = torch.cuda.current_stream(self.device).record_event() if self.cuda else None
        copy = Copy(src, dst, after)
        if self.device.type == "mps":  # MPS is not driven from a second thread; its memory is the RAM anyway
            self._run(copy)
        else:
            self._queue.put(copy)
        return copy

    def wait(self, copy: Copy) -> None:
        """Make the device's compute wait for the copy (on CUDA without blocking the host once it is queued)."""
        copy.queued.wait()
        if copy.error is not None:
            raise copy.error
        if copy.event is not None:
            torch.cuda.current_stream(self.device).wait_event(copy.event)

    def _work(self) -> None:
        while True:
            copy = self._queue.get()
            if copy is None:
                return
            self._run(copy)

    def _run(self, copy: Copy) -> None:
        try:
            self._copy(copy)
            self.bytes += copy.src.nbytes
        except BaseException as e:  # handed to the thread that waits for it
            copy.error = e
        copy.queued.set()

    def _copy(self, copy: Copy) -> None:
        src = torch.from_numpy(copy.src)
        if not self.cuda:
            copy.dst.copy_(src)
            return
        i = self._next
        self._next = (i + 1) % len(self.staging)
        if self._staging_done[i] is not None:
            self._staging_done[i].synchronize()  # its previous transfer has left the buffer
        staging = self.staging[i][:src.numel()]
        staging.copy_(src)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(copy.after)
            copy.dst.copy_(staging, non_blocking=True)
            copy.event = self._staging_done[i] = self.stream.record_event()

    def close(self) -> None:
        self._queue.put(None)


class DeviceTier:
    """A device tier of `slots` expert slots in front of `host`; implements runtime.experts.ExpertsContainer."""

    def __init__(self, host: RoutedExperts, layout: ExpertLayout, activation: str, device: torch.device | str,
                 slots: int, costs: MissCosts, *, policy: str = "default", compute: torch.dtype | None = None,
                 batch: int = 2, prefetch: bool = True, misses: str = "auto"):
        from .device import default_dtype

        if misses not in MISSES:
            raise ValueError(f"misses must be one of {', '.join(MISSES)}; got {misses!r}")
        self.host, self.layout, self.costs = host, layout, costs
        self.device = torch.device(device)
        self.compute = compute or default_dtype(self.device)
        self.kernel = ExpertKernel(layout, activation, self.device, self.compute, batch)
        self.capacity, self.policy_name, self.prefetch, self.misses = slots, policy, prefetch, misses
        self.cache: ExpertCache | None = None
        self.pool = torch.empty((slots, layout.nbytes), dtype=torch.uint8, device=self.device)
        self.copier = Copier(self.device, layout.nbytes)
        weakref.finalize(self, self.copier.close)
        self.decoder: Lookahead | None = None
        self.layers: list[int] = []
        self.pos: dict[int, int] = {}
        self._copies: dict[tuple[int, int], tuple[Copy, Callable[[], None] | None]] = {}  # into slots, unused yet
        self._prefetched: set[tuple[int, int]] = set()
        self._decode = False
        self.reset_stats()

    # -- the contract with the engine -----------------------------------------------------------------------
    def attach(self, decoder: Lookahead) -> None:
        self.host.attach(decoder)
        self.decoder = decoder
        self.layers = list(decoder.moe_layers)
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        if self.cache is None and self.capacity > 0:
            self.cache = ExpertCache(self.capacity, make_policy(self.policy_name, len(self.layers),
                                                                decoder.stored_experts, decoder.experts_per_token))
        self.host.elsewhere = self._on_device

    def begin_step(self, phase: Phase, tokens: int) -> None:
        self.host.begin_step(phase, tokens)
        self._decode = phase == "decode"
        self._prefetched.clear()
        if self._decode:
            self.decode_tokens += 1
            if self._decode_bytes0 is None:
                self._decode_bytes0 = self.copier.bytes

    def reset_stats(self) -> None:
        self.host.reset_stats()
        self.accesses = self.hits = self.prefetch_hits = 0  # decode steps
        self.prefetch_copies = self.prefetches_used = self.demand_copies = self.fill_copies = 0
        self.calls = {"gpu": 0, "cpu": 0}  # expert calls, prefill and decode
        self.decode_calls = {"gpu": 0, "cpu": 0}
        self.decode_tokens = 0
        self.copy_wait_seconds = 0.0
        self._bytes0 = self.copier.bytes
        self._decode_bytes0: int | None = None

    def stats(self) -> dict:
        host = self.host.stats()
        calls, decode = sum(self.calls.values()), sum(self.decode_calls.values())
        decode_bytes = 0 if self._decode_bytes0 is None else self.copier.bytes - self._decode_bytes0
        host_offload = host.get("offload", False)
        out = dict(host)
        out.update({  # "offload" stays the RAM tier's: whether experts stream from the store
            "device": str(self.device),
            "gpu_expert_slots": self.capacity,
            "experts_total": len(self.layers) * self.decoder.stored_experts,
            "gpu_hit_rate": self.hits / self.accesses if self.accesses else 0.0,
            "gpu_prefetch_hit_rate": self.prefetch_hits / self.accesses if self.accesses else 0.0,
            "gpu_prefetch_precision": self.prefetches_used / self.prefetch_copies if self.prefetch_copies else 0.0,
            "ram_hit_rate": host["hit_rate"] if host_offload else 1.0,
            "gpu_expert_share": self.calls["gpu"] / calls if calls else 0.0,
            "cpu_expert_share": self.calls["cpu"] / calls if calls else 0.0,
            "decode_gpu_expert_share": self.decode_calls["gpu"] / decode if decode else 0.0,
            "decode_cpu_expert_share": self.decode_calls["cpu"] / decode if decode else 0.0,
            "h2d_bytes": self.copier.bytes - self._bytes0,
            "h2d_bytes_per_token": decode_bytes / self.decode_tokens if self.decode_tokens else 0.0,
            "gpu_copies": {"demand": self.demand_copies, "prefetch": self.prefetch_copies, "fill": self.fill_copies},
            "copy_wait_seconds": self.copy_wait_seconds,
            "misses": self.misses,
        })
        if not host_offload:  # every expert in RAM: the RAM tier reads nothing
            out.update(hit_rate=1.0, bytes_read=0, bytes_read_per_token=0.0)
        else:  # shares of all the decoded experts, not of those the RAM tier was asked for
            skipped, n = host["skipped_experts"], self.accesses
            out.update(substituted_rate=host["substituted_experts"] / n if n else 0.0,
                       skipped_rate=skipped / (skipped + n) if skipped + n else 0.0)
        return out

    def residency(self) -> Residency:
        host = self.host.residency()
        if host is None:  # every expert in RAM
            host = Residency({(layer, e) for layer in self.layers for e in range(self.decoder.stored_experts)}, set())
        keys = self.cache.resident() if self.cache is not None else []
        return host._replace(on_device=frozenset((self.layers[p], e) for p, e in keys))

    def close(self) -> None:
        self.copier.close()
        self.host.close()

    # -- the layer call -------------------------------------------------------------------------------------
    def _on_device(self, key: tuple[int, int]) -> bool:
        """Whether the RAM tier may skip reading `key` ahead: it is in a device slot (key: (MoE position, e))."""
        return self.cache is not None and self.cache.contains(key)

    def _wants_copy(self, tokens: int) -> bool:
        return self.misses == "copy" or self.misses == "auto" and self.costs.copy_wins(tokens)

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        pos = self.pos[layer]
        chosen = idx[0].tolist() if self._decode else None  # the routing's own choices, for the policies
        if self._decode:  # light experts that neither tier holds: left out or replaced, as the RAM tier's options say
            idx, weights = self.host.light_misses(layer, x, idx, weights)
        T, K = idx.shape
        if not K:
            self._observe(pos, layer, chosen)
            return torch.zeros_like(x)
        flat = idx.reshape(-1).cpu()
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        groups = dict(zip(experts.tolist(), torch.split(order, counts.tolist())))  # expert -> its (token, k)s
        needed = {(pos, e) for e in groups}
        self._tidy(pos, needed)
        on_device, copy, on_cpu = [], [], []
        for e, sel in groups.items():
            key = (pos, e)
            slot = self.cache.lookup(key) if self.cache is not None else None
            if self._decode:
                self.accesses += 1
            if slot is not None:
                if self._decode:
                    if key in self._prefetched:
                        self.prefetch_hits += 1
                    else:
                        self.hits += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.prefetches_used += 1
                on_device.append(e)
            elif self.cache is not None and self._wants_copy(len(sel)):
                admitted = self.cache.admit(key, pinned=needed | self._in_flight())
                if admitted is None:
                    on_cpu.append(e)
                else:
                    slot, evicted = admitted
                    self._forget(evicted)
                    copy.append(e)
            else:
                on_cpu.append(e)
        order_ram = self.host.prepare(layer, x, on_cpu + copy)
        for e in [e for e in order_ram if e in copy]:
            key = (pos, e)
            if not self.host.in_slot(layer, e):  # read into a buffer the RAM tier reuses at once: compute it there
                self.cache.remove(key)
                copy.remove(e)
                on_cpu.append(e)
                continue
            held = self.host.chunk(layer, e)
            self._copies[key] = (self.copier.submit(held.data, self.pool[self.cache.slot_of(key)]), held.release)
            self.demand_copies += 1
        if self.prefetch and self._decode and self.cache is not None and pos + 1 < len(self.layers):
            self._prefetch(pos, x, needed)
        for where, n in (("gpu", len(on_device) + len(copy)), ("cpu", len(on_cpu))):
            self.calls[where] += n
            if self._decode:
                self.decode_calls[where] += n
        out = self._compute(layer, pos, x, weights.reshape(-1).cpu(), groups, K, on_device, copy,
                            [e for e in order_ram if e in on_cpu])
        if self.cache is not None and on_cpu:
            self._fill(pos, layer, on_cpu, needed)
        self._observe(pos, layer, chosen)
        return out

    def _observe(self, pos: int, layer: int, chosen: list[int] | None) -> None:
        """A decoded token's choices at this layer, for both tiers' policies."""
        if chosen is not None:
            if self.cache is not None:
                self.cache.policy.observe(pos, chosen)
            self.host.observe(layer, chosen)

    def _compute(self, layer: int, pos: int, x: torch.Tensor, w: torch.Tensor, groups: dict, K: int,
                 on_device: list[int], copied: list[int], on_cpu: list[int]) -> torch.Tensor:
        """Device experts whose bytes are there are queued first, the CPU experts computed meanwhile, then the
        device experts still being copied. Returns sum_k w * expert_k(x), [T, D], on x's device."""
        x_cpu = x.detach().to("cpu", torch.float32) if on_cpu else None
        xd = x.to(self.device, torch.float32)
        ready = [e for e in on_device if (pos, e) not in self._copies or self._copies[(pos, e)][0].queued.is_set()]
        later = [e for e in on_device if e not in ready] + copied
        sels, ys = [], []  # (token, k) positions, their outputs on the device
        self._device_batch(pos, ready, xd, groups, K, sels, ys)
        cpu = [self.host.expert(layer, e, x_cpu[groups[e] // K]) for e in on_cpu]
        self._device_batch(pos, later, xd, groups, K, sels, ys)
        if cpu:
            sels += [groups[e] for e in on_cpu]
            ys.append(torch.cat(cpu).to(self.device))
        sel = torch.cat(sels)
        y = torch.cat(ys) * w[sel].to(self.device, torch.float32)[:, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=self.device)
        out.index_add_(0, (sel // K).to(self.device), y)
        return out.to(x.device, x.dtype)

    def _device_batch(self, pos: int, batch: list[int], xd: torch.Tensor, groups: dict, K: int, sels: list,
                      ys: list) -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        for e in batch:
            if (pos, e) in self._copies:
                self._settle((pos, e))
        self.copy_wait_seconds += time.perf_counter() - t0
        groups_here = [groups[e] for e in batch]
        ys.append(self.kernel(self.pool, [self.cache.slot_of((pos, e)) for e in batch], xd,
                              [g // K for g in groups_here]))
        sels.extend(groups_here)

    # -- copies ahead and their bookkeeping -----------------------------------------------------------------
    def _prefetch(self, pos: int, x: torch.Tensor, needed: set) -> None:
        """Copy the experts the next layer's router picks for x that are in RAM now."""
        j = pos + 1
        routing = self.decoder.lookahead(self.layers[pos], self.layers[j], x)
        if routing.probs.shape[0] == 1:
            self.cache.policy.predict(j, routing.probs[0].tolist())
        for e in routing.idx.unique().tolist():
            if self._copy_from_ram((j, e), self.layers[j], needed):
                self._prefetched.add((j, e))
                self.prefetch_copies += 1

    def _fill(self, pos: int, layer: int, on_cpu: list[int], needed: set) -> None:
        """Copy the experts just computed on the CPU into device slots in the background, where the policy finds
        them worth a slot, so that their next use is a device hit. Only while no other copy is under way: copies
        ahead, which the next layer waits for, come first."""
        if self._in_flight():
            return
        for e in on_cpu:
            self.fill_copies += self._copy_from_ram((pos, e), layer, needed)

    def _copy_from_ram(self, key: tuple[int, int], layer: int, needed: set) -> bool:
        """Start copying key's chunk into a device slot if it is in RAM now, not on the device yet, and the cache
        admits it; whether a copy started."""
        if self.cache.contains(key):
            return False
        held = self.host.resident_chunk(layer, key[1])
        if held is None:
            return False  # not in RAM yet: the RAM tier reads it ahead, and a miss decides then
        admitted = self.cache.admit(key, pinned=needed | self._in_flight())
        if admitted is None:
            held.release()
            return False
        slot, evicted = admitted
        self._forget(evicted)
        self._copies[key] = (self.copier.submit(held.data, self.pool[slot]), held.release)
        return True

    def _in_flight(self) -> set:
        """Keys whose copies have not left RAM yet: no admission may evict them."""
        return {key for key, (copy, _) in self._copies.items() if not copy.queued.is_set()}

    def _tidy(self, pos: int, needed: set) -> None:
        """Let the RAM tier reuse chunks that have been copied; settle the copies of layers already passed and of
        this layer's experts it did not choose."""
        for key, (copy, release) in list(self._copies.items()):
            if key[0] < pos or key[0] == pos and key not in needed:
                self._settle(key)
            elif release is not None and copy.queued.is_set():
                release()
                self._copies[key] = (copy, None)

    def _settle(self, key: tuple[int, int]) -> None:
        """The copy into key's slot is queued (the compute stream will wait for it) and its source released."""
        copy, release = self._copies.pop(key)
        try:
            self.copier.wait(copy)
        except BaseException:
            self.cache.remove(key)
            raise
        finally:
            if release is not None:
                release()

    def _forget(self, key: tuple[int, int] | None) -> None:
        """key was evicted from its slot."""
        if key is not None:
            self._prefetched.discard(key)
            if key in self._copies:
                self._settle(key)
