"""The advisor's inputs besides steps and workload: latency targets (SLOs) and the cluster.

Validated at construction: a bad value raises :class:`InputError` naming it, which ``phaselens advise``
turns into a usage error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from phaselens.engine.config import ModelConfig
from phaselens.gpus import GpuSpec


class InputError(ValueError):
    """A bad advisor input; the message names the value, ``field`` the input it came from (the
    :class:`Slo` or :class:`Cluster` field, so a front-end can name its own option)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def tp_problem(model: ModelConfig, tp: int) -> str | None:
    """Why an instance of ``tp`` GPUs cannot shard ``model``'s attention, or None when it can.

    Tensor parallelism splits the attention heads over the GPUs: the query heads must divide evenly, and the
    KV heads must either divide evenly or, when there are fewer of them than GPUs, be replicated an equal
    number of times (the conditions vLLM's Llama attention asserts).
    """
    if model.num_heads % tp:
        return f"its {model.num_heads} attention heads do not divide over {tp} GPUs"
    kv = model.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        return f"its {kv} KV heads neither divide over {tp} GPUs nor replicate evenly on them"
    return None


@dataclass(frozen=True)
class Slo:
    """Latency targets: the ``ttft_pct`` percentile of TTFT under ``ttft_s`` and likewise for TPOT.

    TPOT of a request is ``(finish - first token) / (output tokens - 1)`` (DistServe's definition);
    ``attainment`` is the share of requests that must meet *both* targets in the simulator (joint).
    """

    ttft_s: float
    tpot_s: float
    ttft_pct: float = 90.0
    tpot_pct: float = 90.0
    attainment: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InputError(
                    f"SLO {name.replace('_s', '')} must be a positive number of seconds, got {v!r}", name
                )
        for name in ("ttft_pct", "tpot_pct"):
            v = getattr(self, name)
            if not (0 < v <= 100):
                raise InputError(
                    f"SLO percentile {name.replace('_pct', '')} must be in (0, 100], got {v!r}", name
                )
        if self.attainment is not None and not (0 < self.attainment <= 1):
            raise InputError(f"SLO attainment must be in (0, 1], got {self.attainment!r}", "attainment")
        if self.tpot_s > 100 * self.ttft_s:
            # A token budget a hundred times the wait for the first token is almost surely a unit mix-up
            # (ms given as s); refuse rather than plan for it.
            raise InputError(
                f"inconsistent SLOs: TPOT {self.tpot_s} s is over 100x TTFT {self.ttft_s} s; "
                "are the units mixed (seconds expected)?",
                "tpot_s",
            )

    def describe(self) -> str:
        return (
            f"P{self.ttft_pct:g} TTFT <= {self.ttft_s * 1e3:g} ms, P{self.tpot_pct:g} TPOT <= "
            f"{self.tpot_s * 1e3:g} ms"
            + (f", joint attainment >= {self.attainment:.0%}" if self.attainment else "")
        )


@dataclass(frozen=True)
class Cluster:
    """What the operator has: GPUs, their kind, node size, the KV link, and the price of a GPU-hour."""

    gpus: int
    gpu: GpuSpec
    model: ModelConfig
    gpus_per_node: int = 8
    #: per-GPU network bandwidth between pools, Gb/s (400 = one NDR InfiniBand port per GPU)
    kv_link_gbps: float = 400.0
    #: whether KV transfer overlaps the prefill layer by layer (only the last layer's share is exposed)
    kv_overlap: bool = False
    price_per_gpu_hour: float = 2.0
    dtype_bytes: int = 2
    memory_utilization: float = 0.9
    #: KV admission high watermark of decode workers (share of KV capacity)
    kv_high_watermark: float = 0.9
    tp_degrees: tuple[int, ...] = field(default=())
    #: latency every request pays before its first token outside the engine's steps (HTTP, tokenization,
    #: scheduling, returning the token): added to TTFT
    ttft_overhead_s: float = 0.0
    #: the engine's fixed token budget per step (its max_num_batched_tokens): only that chunk budget is
    #: considered for colocated and conditional placements, and split prefill workers chunk prompts at it
    #: (None: every budget the screen knows, whole prompts on prefill workers; 0: whole prompts, no chunking)
    chunk_budget: int | None = None
    #: most sequences one engine instance runs at once (its max_num_seqs); None: no limit
    max_num_seqs: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise InputError(f"GPU count must be a positive integer, got {self.gpus!r}", "gpus")
        if self.gpus_per_node < 1:
            raise InputError(f"GPUs per node must be >= 1, got {self.gpus_per_node!r}", "gpus_per_node")
        if not (self.kv_link_gbps > 0 and math.isfinite(self.kv_link_gbps)):
            raise InputError(f"KV link bandwidth must be > 0 Gb/s, got {self.kv_link_gbps!r}", "kv_link_gbps")
        if self.price_per_gpu_hour < 0:
            raise InputError(f"price per GPU-hour must be >= 0, got {self.price_per_gpu_hour!r}",
                             "price_per_gpu_hour")
        if not (0 <= self.ttft_overhead_s < 60):
            raise InputError(f"TTFT overhead must be in [0, 60) s, got {self.ttft_overhead_s!r}",
                             "ttft_overhead_s")
        cb, ms = self.chunk_budget, self.max_num_seqs
        if cb is not None and (not isinstance(cb, int) or cb < 0):
            raise InputError(f"chunk budget must be a whole number of tokens >= 0, got {cb!r}",
                             "chunk_budget")
        if ms is not None and (not isinstance(ms, int) or ms < 1):
            raise InputError(f"max sequences per instance must be an integer >= 1, got {ms!r}",
                             "max_num_seqs")
        for tp in self.tp_degrees:
            if tp < 1 or tp > self.gpus_per_node:
                raise InputError(
                    f"TP degree {tp} must be between 1 and the GPUs per node ({self.gpus_per_node})",
                    "tp_degrees",
                )
            why = tp_problem(self.model, tp)
            if why:
                raise InputError(f"TP degree {tp} does not fit model {self.model.name!r}: {why}",
                                 "tp_degrees")

    @property
    def link_bytes_per_s(self) -> float:
        return self.kv_link_gbps * 1e9 / 8.0

    def candidate_tp(self) -> tuple[int, ...]:
        """TP degrees to consider: the given ones, else the powers of two within a node and the cluster that
        shard the model's attention heads (:func:`tp_problem`)."""
        if self.tp_degrees:
            return tuple(sorted(set(self.tp_degrees)))
        out, tp = [], 1
        while tp <= min(self.gpus_per_node, self.gpus):
            if tp_problem(self.model, tp) is None:
                out.append(tp)
            tp *= 2
        return tuple(out)
