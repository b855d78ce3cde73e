"""Closed-form costs from a profile, evaluated in microseconds inside the event loop.

Every time the simulator charges (iterations, merges, loads, swaps, transfers) comes from here, so
swapping a profile changes all of them together and nothing is hard-coded elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dlora_sim.core.profile import Profile
from dlora_sim.core.step import LoraFeatures, Prices, Step


@dataclass(frozen=True)
class MemoryLayout:
    """How one replica's GPU memory splits into weights, adapter slots and KV blocks."""

    total_kv_blocks: int
    block_size: int
    block_bytes: int


# How merged weights are kept (cluster.replica.merge):
#   inplace       W += s*B*A to merge, W -= s*B*A to unmerge (PEFT, the dLoRA artifact): no extra memory,
#                 a switch is an unmerge and a merge, and the weights drift by rounding;
#   pristine_gpu  drift-free from a pristine copy of the touched weights on the GPU (dlora_gpu's merger):
#                 one pass per merge or switch, a copy per unmerge, the copy's bytes taken from the KV cache;
#   pristine_host the pristine copy in host memory: no GPU memory, every change streams it over PCIe.
MERGE_STRATEGIES = ("inplace", "pristine_gpu", "pristine_host")


class CostModel:
    def __init__(self, profile: Profile, gpus_per_replica: int = 1, merge: str = "inplace"):
        if gpus_per_replica < 1:
            raise ValueError("gpus_per_replica must be >= 1")
        if merge not in MERGE_STRATEGIES:
            raise ValueError(f"cluster.replica.merge must be one of {list(MERGE_STRATEGIES)}, got {merge!r}")
        self.profile = profile
        self.gpus = gpus_per_replica
        self.merge = merge
        it, lo = profile.iteration, profile.lora
        # Tensor parallelism divides the bandwidth/FLOP-bound terms; software overheads stay.
        g = float(gpus_per_replica)
        self._overhead = it.overhead_s
        self._per_seq = it.per_seq_s
        self._weight = it.weight_read_s / g
        self._per_tok = it.per_token_s / g
        self._per_ctx = it.per_context_token_s / g
        self._per_sq = it.per_prefill_sq_s / g
        self._multi = it.multi_token_s   # the kernel choice of a one-token batch: not split across GPUs
        self._lora_overhead = lo.overhead_s
        self._lora_adapter = lo.per_adapter_rank_s / g
        self._lora_token = lo.per_token_rank_s / g
        self._lora_per_adapter = lo.per_adapter_s
        self._lora_per_call = lo.per_call_s
        self.lora_path = profile.lora_path
        self._einsum = profile.lora_path == "einsum"

    def iteration_time(self, *, prefill_tokens: int = 0, prefill_sq: int = 0, decode_seqs: int = 0,
                       decode_context: int = 0, num_seqs: int, lora_rank_sum: int = 0, lora_token_rank: int = 0,
                       resident_rank_sum: int = 0, lora_passes: int = 0) -> float:
        """Seconds for one iteration of a batch described by its features (named: a policy prices
        batches it has not built). `lora_rank_sum` = sum of ranks of the distinct adapters of an
        unmerged batch (0 in merged mode: no LoRA term at all); `lora_token_rank` = sum over the
        batch's tokens of their adapter's rank; `resident_rank_sum` = ranks of the adapters in GPU slots,
        which the einsum path prices instead (every token against every resident adapter; 0 = not known,
        the batch's adapters); `lora_passes` = the LoRA passes the per-adapter term charges (`Step.lora_passes`).
        The per-call term charges one LoRA call for the prefills and one for the decodes, as the runtime
        makes them (every request of an unmerged batch has an adapter)."""
        return self._compute(prefill_tokens, prefill_sq, decode_seqs, decode_context, num_seqs, lora_rank_sum,
                             lora_token_rank, resident_rank_sum, lora_passes)

    def _compute(self, prefill_tokens: int, prefill_sq: int, decode_seqs: int, decode_context: int,
                 num_seqs: int, lora_rank_sum: int, lora_token_rank: int, resident_rank_sum: int,
                 lora_passes: int) -> float:
        tokens = prefill_tokens + decode_seqs
        # summed in decode_repeats' order (fast-forward prices exactly what single iterations would)
        t = (self._overhead + self._per_seq * num_seqs + max(self._weight, self._per_tok * tokens)
             + (self._multi if tokens >= 2 else 0.0) + self._per_ctx * decode_context + self._per_sq * prefill_sq)
        if lora_rank_sum:
            t += self._lora(tokens, lora_rank_sum, lora_token_rank, resident_rank_sum, lora_passes,
                            (prefill_tokens > 0) + (decode_seqs > 0))
        return t

    def price(self, step: Step) -> Prices:
        """What a step costs: compute (no LoRA terms when merged), mode change, adapter loads, KV swaps."""
        lora = LoraFeatures.of(step)
        compute = self._compute(step.prefill_tokens, step.prefill_sq, step.decode_seqs, step.decode_context,
                                len(step.batch), lora.rank_sum, lora.token_rank, step.resident_rank_sum, lora.passes)
        load = 0.0
        for nbytes in step.load_bytes:
            load += self.load_time(nbytes)
        if step.overlap_loads:   # the copies run beside the compute: only what outlasts it shows
            load = max(0.0, load - compute)
        if step.store_s:
            load += step.store_s
        return Prices(compute, self.mode_change_time(step.mode_from, step.decision.merged, step.full_copy), load,
                      self.swap_time(step.swapped_in_blocks + step.swapped_out_blocks, step.block_bytes))

    def repeat_prices(self, step: Step, lo: int, hi: int) -> list[float]:
        """Compute seconds of iterations lo..hi-1 of a decode-only step repeated unchanged (fast-forward):
        every sequence's context grows by one token per iteration."""
        lora = LoraFeatures.of(step)
        return self.decode_repeats(step.decode_seqs, step.decode_context, lo, hi, lora_rank_sum=lora.rank_sum,
                                   lora_token_rank=lora.token_rank, resident_rank_sum=step.resident_rank_sum,
                                   lora_passes=lora.passes)

    def _lora(self, tokens: int, lora_rank_sum: int, lora_token_rank: int, resident_rank_sum: int,
              lora_passes: int, calls: int) -> float:
        if self._einsum:
            resident = max(resident_rank_sum, lora_rank_sum)
            return self._lora_overhead + self._lora_adapter * resident + self._lora_token * tokens * resident
        return (self._lora_overhead + self._lora_adapter * lora_rank_sum + self._lora_token * lora_token_rank
                + self._lora_per_adapter * lora_passes + self._lora_per_call * calls)

    def decode_repeats(self, n: int, context: int, lo: int, hi: int, *, lora_rank_sum: int = 0,
                       lora_token_rank: int = 0, resident_rank_sum: int = 0, lora_passes: int = 0) -> list[float]:
        """`iteration_time` of decode iterations lo..hi-1 of a repeated batch of n sequences whose total
        context starts at `context` and grows by n per iteration (the simulator's fast-forward): the same
        operations in the same order, with the terms that do not change hoisted out of the loop."""
        base = (self._overhead + self._per_seq * n + max(self._weight, self._per_tok * n)
                + (self._multi if n >= 2 else 0.0))
        per_ctx, sq = self._per_ctx, self._per_sq * 0
        if not lora_rank_sum:
            return [base + per_ctx * (context + i * n) + sq for i in range(lo, hi)]
        lora = self._lora(n, lora_rank_sum, lora_token_rank, resident_rank_sum, lora_passes, 1)
        return [base + per_ctx * (context + i * n) + sq + lora for i in range(lo, hi)]

    def decode_time(self, batch: int, context: int, merged: bool = True, distinct_adapters: int = 1,
                    rank: int = 16, resident_adapters: int = 0) -> float:
        """Convenience: a pure-decode iteration of `batch` sequences with `context` tokens each."""
        return self.iteration_time(decode_seqs=batch, decode_context=batch * context, num_seqs=batch,
                                   lora_rank_sum=0 if merged else distinct_adapters * rank,
                                   lora_token_rank=0 if merged else batch * rank,
                                   resident_rank_sum=resident_adapters * rank,
                                   lora_passes=0 if merged else distinct_adapters)

    # --- mode changes, loads, swaps, transfers ---------------------------------------------------
    def mode_change_time(self, old: int | None, new: int | None, full_copy: bool = False) -> float:
        """Merged on `old` (None = clean) -> merged on `new`, by the merge strategy. Whole-model copies
        switch for free."""
        if old == new or full_copy:
            return 0.0
        sw = self.profile.switch
        if self.merge == "pristine_host":   # stream the pristine copy over PCIe, whatever the change
            return self.profile.model.merge_bytes / (self.profile.transfers.host_to_gpu_bytes_per_s * self.gpus)
        if self.merge == "inplace":
            passes = 1 if old is None or new is None else 2
            return passes * sw.merge_s / self.gpus
        if old is None:
            return sw.merge_s / self.gpus
        if new is None:
            return sw.unmerge_s / self.gpus
        return sw.switch_s / self.gpus

    def merge_copy_bytes(self) -> int:
        """GPU bytes the merge strategy keeps besides the weights (per GPU of the replica, summed)."""
        return self.profile.model.merge_bytes if self.merge == "pristine_gpu" else 0

    def load_time(self, nbytes: int) -> float:
        tr = self.profile.transfers
        return tr.load_overhead_s + nbytes / (tr.host_to_gpu_bytes_per_s * self.gpus)

    def store_time(self, nbytes: int) -> float:
        """One adapter fetched from the backing store into host memory (a bounded host adapter cache's miss)."""
        tr = self.profile.transfers
        if tr.store_bytes_per_s <= 0:
            raise ValueError(f"{self.profile.path or self.profile.name}: 'transfers.store_bytes_per_s' is 0: this "
                             "profile prices no backing store, so cluster.replica.host_adapter_cache must be null")
        return tr.store_latency_s + nbytes / tr.store_bytes_per_s

    def swap_time(self, blocks: int, block_bytes: int) -> float:
        """KV blocks moved between GPU and host in one iteration (both directions together)."""
        if not blocks:
            return 0.0
        tr = self.profile.transfers
        return tr.swap_overhead_s + blocks * block_bytes / (tr.kv_swap_bytes_per_s * self.gpus)

    def kv_transfer_time(self, tokens: int) -> float:
        """One migrated request's KV moved to another replica: a fixed cost per transfer (0 in profiles
        that predate its measurement) plus its bytes over the inter-replica bandwidth."""
        tr = self.profile.transfers
        return tr.kv_transfer_overhead_s + self.kv_bytes(tokens) / tr.kv_transfer_bytes_per_s

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.profile.model.kv_bytes_per_token

    # --- memory ------------------------------------------------------------------------------------
    def usable_bytes(self) -> float:
        p = self.profile
        return p.hardware.gpu_bytes * p.memory.gpu_utilization * self.gpus

    def memory_layout(self, block_size: int, adapter_slots: int, slot_bytes: int, reserved: int = 0) -> MemoryLayout:
        """KV blocks left after the weights, the activation reserve, the adapter slots and `reserved`
        bytes (a merge strategy's pristine copy)."""
        p = self.profile
        usable = self.usable_bytes()
        weights = p.model.weight_bytes
        free = usable - weights - p.memory.activation_reserve_bytes * self.gpus - adapter_slots * slot_bytes - reserved
        block_bytes = block_size * p.model.kv_bytes_per_token
        blocks = math.floor(free / block_bytes)
        if blocks < 1:
            raise ValueError(
                f"no room for a KV cache on {p.hardware.name} x{self.gpus}: {usable / 1e9:.1f} GB usable, "
                f"weights {weights / 1e9:.1f} GB, {adapter_slots} adapter slots of {slot_bytes / 1e9:.2f} GB"
                + (f", a {reserved / 1e9:.1f} GB pristine copy for merging" if reserved else ""))
        return MemoryLayout(blocks, block_size, block_bytes)
