"""Host time between an engine's steps: the part of the step cadence the GPU intervals do not show.

A step record's interval is the GPU's (CUDA events); between two steps the GPU waits while the host
schedules the next step, builds its inputs and hands the last step's outputs on. An engine steps back to
back, so a sequence gets one token per *cadence* = host gap + GPU interval. On the H200 with the 8B preset
(issue 8) the gap before a decode step at batch 40-64 was 1.75 ms in serving (median) against 6.3 ms of
GPU time: a step model of GPU intervals alone put the decode cadence 20-30% short.

Two parts, both per step:

* **engine host gap**, fitted from the trace: consecutive step records of one engine where the later step
  carries decodes (sequences were running, so the engine stepped as soon as it could: the gap is host
  work, not waiting for requests), gap under :data:`GAP_MAX_S`. Per phase of the later step,
  ``h0 + h1 * batch`` (batch = sequences in that step), a least-absolute-deviation fit (the median line:
  a few stalls, GC or a slow launch, do not pull it). A prefill-only step follows idle time or request
  submission in a trace, so its gaps are not the engine's alone: it takes the mixed line (a prefill step
  builds prompt inputs and runs eagerly, as a mixed step does), else the decode one.
* **serving overhead**: what the serving path adds per step that an in-process profile does not see
  (each step's outputs pickled into one message to the front-end, one entry per sequence, and the
  front-end's reading it). Calibrated from the request log the advisor is given
  (:func:`estimate_serving_overhead`): a per-step constant, plus a per-sequence part taken equal to the
  engine's own per-sequence decode host time (:data:`SERVING_PER_SEQ_REPEATS`), since the serving path
  repeats that per-sequence output work once (issue 8's H200 serving trace: 24.6 us per sequence before a
  decode step in serving, 11.5 us in the in-process profile); a low-load log cannot separate the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from phaselens.phase import Phase
from phaselens.trace import StepRecord

if TYPE_CHECKING:  # pragma: no cover
    from phaselens.advisor.step_model import StepCoefficients
    from phaselens.advisor.workload import Workload

#: Gaps longer than this are not back-to-back stepping (a stall, a pause of the harness) and are left out.
GAP_MAX_S = 0.02
#: Back-to-back pairs a phase's line needs (4 per coefficient, as the step model's fits).
MIN_PAIRS = 8
#: The serving path's per-sequence host time, in multiples of the engine's own per-sequence decode host time
#: (see the module docstring for the measurement).
SERVING_PER_SEQ_REPEATS = 1.0
#: Requests (with at least two decode steps) the serving-overhead estimate needs from the request log.
MIN_LOGGED_REQUESTS = 10
#: The serving overhead is clipped to this (s per step): more is a broken log, not host time.
MAX_SERVING_OVERHEAD_S = 0.05

_IRLS_ITERS = 60


@dataclass(frozen=True)
class HostGap:
    """Host time before a step, per phase ``h0 + h1 * batch`` (s, s per sequence), plus the serving
    overhead ``serving_s + serving_per_seq_s * batch`` on every step. Zero unless fitted."""

    decode: tuple[float, float] = (0.0, 0.0)
    mixed: tuple[float, float] = (0.0, 0.0)
    prefill: tuple[float, float] = (0.0, 0.0)
    serving_s: float = 0.0
    serving_per_seq_s: float = 0.0
    #: back-to-back pairs fitted per phase; empty when not fitted
    pairs: dict[str, int] = field(default_factory=dict)
    #: median absolute deviation of the fitted gaps from their line (s), per phase
    spread_s: dict[str, float] = field(default_factory=dict)
    #: where the serving overhead came from ("" when none)
    serving_source: str = ""

    def before(self, phase: Phase, batch: float) -> float:
        """Host time (s) before a step of ``phase`` running ``batch`` sequences."""
        if phase is Phase.DECODE:
            h0, h1 = self.decode
        else:
            h0, h1 = self.mixed if phase is Phase.MIXED else self.prefill
        return h0 + h1 * batch + self.serving_s + self.serving_per_seq_s * batch

    @property
    def fitted(self) -> bool:
        return bool(self.pairs)

    def engine_only(self) -> "HostGap":
        """This gap without the serving overhead."""
        return replace(self, serving_s=0.0, serving_per_seq_s=0.0, serving_source="")

    def with_serving(self, per_step_s: float, source: str) -> "HostGap":
        """This gap plus a serving overhead of ``per_step_s`` per step and the per-sequence repeat."""
        return replace(self, serving_s=per_step_s, serving_per_seq_s=SERVING_PER_SEQ_REPEATS * self.decode[1],
                       serving_source=source)

    def describe(self) -> str:
        def line(name: str, h: tuple[float, float]) -> str:
            return f"{name} {h[0] * 1e3:.2f} ms + {h[1] * 1e6:.1f} us/seq"

        parts = [line("decode", self.decode), line("mixed", self.mixed)]
        fitted = ", ".join(f"{k} {v}" for k, v in self.pairs.items())
        prefill_line = "mixed" if self.pairs.get("mixed") else "decode"
        return (f"host time between steps added to every simulated step (fitted from back-to-back step pairs "
                f"of one engine, gap < {GAP_MAX_S * 1e3:g} ms: {fitted}): " + ", ".join(parts)
                + f"; prefill-only steps take the {prefill_line} line")

    def to_dict(self) -> dict[str, Any]:
        return {
            "decode_s": list(self.decode),
            "mixed_s": list(self.mixed),
            "prefill_s": list(self.prefill),
            "serving_per_step_s": self.serving_s,
            "serving_per_seq_s": self.serving_per_seq_s,
            "serving_source": self.serving_source,
            "pairs": dict(self.pairs),
            "spread_s": dict(self.spread_s),
            "gap_max_s": GAP_MAX_S,
        }

    # ------------------------------------------------------------------ fit

    @classmethod
    def fit(cls, steps: Sequence[StepRecord]) -> "HostGap":
        """The engine host gap from consecutive step records (zero for a phase with too few pairs)."""
        by_engine: dict[tuple[str, str], list[StepRecord]] = {}
        for s in steps:
            by_engine.setdefault((s.gpu_uuid, s.engine_id), []).append(s)
        rows: dict[Phase, list[tuple[float, float]]] = {Phase.DECODE: [], Phase.MIXED: []}
        for seq in by_engine.values():
            seq.sort(key=lambda s: (s.t0_ns, s.step))
            for a, b in zip(seq, seq[1:]):
                if b.step != a.step + 1 or b.decode_tokens <= 0 or b.phase not in rows:
                    continue
                gap = (b.t0_ns - a.t1_ns) / 1e9
                if 0.0 <= gap < GAP_MAX_S:
                    rows[b.phase].append((float(max(b.batch, b.decode_tokens)), gap))
        lines: dict[str, tuple[float, float]] = {}
        pairs: dict[str, int] = {}
        spread: dict[str, float] = {}
        for phase, data in rows.items():
            if len(data) < MIN_PAIRS:
                continue
            arr = np.asarray(data, dtype=float)
            h, mad = _lad_line(arr[:, 0], arr[:, 1])
            lines[phase.value] = h
            pairs[phase.value] = len(data)
            spread[phase.value] = mad
        if not lines:
            return cls()
        decode = lines.get("decode", lines.get("mixed", (0.0, 0.0)))
        mixed = lines.get("mixed", decode)
        return cls(decode=decode, mixed=mixed, prefill=mixed, pairs=pairs, spread_s=spread)


def _lad_line(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, float], float]:
    """Least-absolute-deviation line ``y ~ h0 + h1 x`` (iteratively reweighted least squares), coefficients
    kept non-negative, and the median absolute residual."""
    xs = np.column_stack([np.ones_like(x), x])
    w = np.ones_like(y)
    coef = np.array([float(np.median(y)), 0.0])
    if np.ptp(x) > 0:
        for _ in range(_IRLS_ITERS):
            sw = np.sqrt(w)
            coef = np.linalg.lstsq(xs * sw[:, None], y * sw, rcond=None)[0]
            if coef[1] < 0:  # host work never shrinks with more sequences: a flat line at the median
                coef = np.array([float(np.median(y)), 0.0])
                break
            w = 1.0 / np.maximum(np.abs(y - xs @ coef), 1e-7)
    coef = np.maximum(coef, 0.0)
    return (float(coef[0]), float(coef[1])), float(np.median(np.abs(y - xs @ coef)))


# ---------------------------------------------------------------------- serving overhead


@dataclass(frozen=True)
class ServingEstimate:
    """The serving overhead per step from a request log, and what it rests on."""

    per_step_s: float
    #: the median residual before clipping (s per step; negative: the model's cadence is too slow)
    raw_s: float
    requests: int
    #: median time-averaged decode batch of the requests used
    batch: float

    def note(self) -> str:
        return (f"serving overhead per step estimated at {self.per_step_s * 1e3:.2f} ms (median over "
                f"{self.requests} logged requests at decode batch ~{self.batch:.1f} of measured TPOT minus "
                f"the modelled step cadence, less {SERVING_PER_SEQ_REPEATS:g}x the per-sequence host time; "
                f"raw {self.raw_s * 1e3:+.2f} ms): added to every simulated step, with the per-sequence part")


def estimate_serving_overhead(co: "StepCoefficients", workload: "Workload",
                              chunk_budget: int | None = None) -> ServingEstimate | None:
    """Per-step time the serving path adds, from the request log behind ``workload`` (None without one).

    For each logged request with two or more decode steps, the log gives its decode interval (first token to
    finish) on its worker. Over that interval the time-averaged batch on the worker is the overlap of every
    request decoding there; the model's time for the interval is its decode steps at that batch (GPU time
    plus the engine host gap of ``co``), plus, for each request prefilled on the same colocated worker within
    the interval, its chunks turning decode steps into mixed ones. The residual per decode step, less the
    serving path's per-sequence part, is the per-step overhead; its median over the requests is the
    estimate (robust to the few requests a stall or a long prompt's chunk landed on).
    """
    times = workload.logged_times
    if times is None:
        return None
    host = co.host.engine_only()
    first, finish = times.first_s, times.finish_s
    prompt = workload.prompt_tokens.astype(float)
    cached = workload.cached_tokens.astype(float)
    out = workload.output_tokens.astype(float)
    ok = np.isfinite(first) & np.isfinite(finish) & (finish > first) & (out >= 3)
    resid, batches = [], []
    for j in np.flatnonzero(ok):
        same = (times.worker == times.worker[j]) & np.isfinite(first) & np.isfinite(finish)
        span = finish[j] - first[j]
        overlap = np.clip(np.minimum(finish, finish[j]) - np.maximum(first, first[j]), 0.0, None) * same
        total = float(overlap.sum())
        b = total / span
        ctx = float((overlap * (prompt + out / 2.0)).sum() / total)
        steps = out[j] - 1.0
        dec = co.decode_time(b, b * ctx) + host.before(Phase.DECODE, b)
        model = steps * dec
        # prefills finished on this worker while j decoded: their chunks made mixed steps of decode steps
        local = same & times.colocated & (first > first[j]) & (first <= finish[j])
        for k in np.flatnonzero(local):
            left = prompt[k] - cached[k]
            done = cached[k]
            room = max(1.0, chunk_budget - b) if chunk_budget else left
            while left > 0:
                n = min(left, room)
                quad = n * n + 2.0 * n * done
                model += (co.mixed_time(n, quad, b, b * ctx) + host.before(Phase.MIXED, b + 1)
                          - co.decode_time(b, b * ctx) - host.before(Phase.DECODE, b))
                left -= n
                done += n
        resid.append((span - model) / steps - SERVING_PER_SEQ_REPEATS * host.decode[1] * b)
        batches.append(b)
    if len(resid) < MIN_LOGGED_REQUESTS:
        return None
    raw = float(np.median(resid))
    per_step = float(min(max(raw, 0.0), MAX_SERVING_OVERHEAD_S))
    if not math.isfinite(per_step):
        return None
    return ServingEstimate(per_step, raw, len(resid), float(np.median(batches)))


__all__ = ["HostGap", "ServingEstimate", "estimate_serving_overhead", "GAP_MAX_S", "SERVING_PER_SEQ_REPEATS"]
