"""Per-phase attribution of GPU counters (DESIGN.md, "Attribution: why it is not a join").

The hardware sees no phases. NVML GPM refreshes about every 100 ms, and the window a refreshed value covers
ends some tens of ms before the poll that first sees it. On the H100 we recorded (bench/RESULTS.md,
issue 12) that delay is a sawtooth: it drifts by ~0.4 ms per second and wraps by one refresh period
(~110 ms -> ~10 ms), because the counter windows and the refresh run on slightly different periods. So:

1. update detection: a counter sample with values is an update; a window is one refresh period ending
   ``offset`` before the poll that saw it;
2. per-window phase overlap fractions ``f_prefill, f_decode, f_mixed`` (idle the rest), from the steps'
   GPU intervals through cumulative busy-time curves (exact, vectorised);
3. ``value_w = sum_p f_wp * u_p + f_idle_w * u_idle``, solved per metric with bounded least squares
   (``u`` in [0, 1]) over a sliding horizon;
4. the offset is tracked, not fitted once: the horizon is cut into chunks of a few seconds, each chunk gets
   a residual curve over candidate offsets, and a dynamic programme picks the offset path with the lowest
   residual plus a penalty on changes (a jump of one whole period, the wrap, costs little); signatures and
   offsets are refined alternately;
5. glitch windows (a refresh that reads zeros while the GPU is busy, or inflated DRAM after it) are
   outliers: dropped beyond a robust threshold before the final fit;
6. standard errors from the fit; a phase with too little time in the horizon is "not enough data".

``naive`` tags each update with the phase running at its poll time: the baseline it beats.
Exact per-phase MFU/MBU come from the steps' FLOPs and bytes against the GPU's peaks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import lsq_linear

from phaselens.agent.state import GpuAttribution, GpuIdentity, PhaseValues
from phaselens.gpus import GpuSpec
from phaselens.phase import Phase
from phaselens.trace import SampleRecord, StepRecord

log = logging.getLogger(__name__)

METHODS = ("unmix", "naive")
#: counter sources in order of preference; the attributor uses the first one present.
COUNTER_PREFERENCE = ("gpm", "dcgm", "simulated", "replay")
#: the metrics that are unmixed (counter metrics; NVML's gpu_util averages over 1/6-1 s and is only blended)
UNMIX_KEYS = ("sm_active", "sm_occupancy", "tensor_active", "dram_active", "fp16_active")
#: the metrics whose residuals decide the offset (the three the product reports)
ALIGN_KEYS = ("sm_active", "tensor_active", "dram_active")
BUSY = Phase.busy()


@dataclass(frozen=True)
class AttributionConfig:
    """Tunables of the method; defaults are what the H100 recordings support.

    See bench/attribution_accuracy.py and bench/RESULTS.md.
    """

    method: str = "unmix"
    horizon_s: float = 60.0
    #: candidate window-to-poll delays searched (ms); the H100 showed 0-115 ms
    offset_min_ms: float = 0.0
    offset_max_ms: float = 220.0
    #: grid step of the offset scan; each chunk's minimum is refined below the grid by a parabola (4 ms and
    #: 2 ms gave the same errors on the H100 recordings, at 60% of the time)
    offset_step_ms: float = 4.0
    #: the offset is assumed constant within a chunk of this many seconds (drift ~0.4 ms/s on H100)
    chunk_s: float = 3.0
    #: DP penalty per ms of offset change, in units of mean squared residual per window
    offset_change_cost: float = 2e-5
    #: below this many update windows in the horizon: not enough data for anything
    min_windows: int = 20
    #: below this much time (seconds of the phase inside windows) a phase has "not enough data"
    min_phase_s: float = 0.5
    #: residuals beyond max(outlier_k * robust sigma, outlier_floor) are glitch windows
    outlier_k: float = 5.0
    outlier_floor: float = 0.04
    iterations: int = 3

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown attribution method {self.method!r}; "
                             f"expected one of {', '.join(METHODS)}")
        if self.horizon_s <= 0:
            raise ValueError(f"horizon_s must be > 0, got {self.horizon_s}")
        if not 0 <= self.offset_min_ms < self.offset_max_ms:
            raise ValueError(f"bad offset range {self.offset_min_ms}..{self.offset_max_ms} ms")
        if self.offset_step_ms <= 0 or self.chunk_s <= 0:
            raise ValueError("offset_step_ms and chunk_s must be > 0")


@dataclass
class _Steps:
    """One GPU's steps as columns, in the order given (one pass over the records; the rest is vectorised)."""

    t0_ns: np.ndarray  # int64
    t1_ns: np.ndarray  # int64
    phase: np.ndarray  # index into BUSY, -1 for an IDLE step
    flops: np.ndarray
    bytes: np.ndarray

    @classmethod
    def of(cls, steps: Sequence[StepRecord]) -> "_Steps":
        n = len(steps)
        code = {p: i for i, p in enumerate(BUSY)}
        return cls(np.fromiter((s.t0_ns for s in steps), np.int64, n),
                   np.fromiter((s.t1_ns for s in steps), np.int64, n),
                   np.fromiter((code.get(s.phase, -1) for s in steps), np.int64, n),
                   np.fromiter((s.flops for s in steps), np.float64, n),
                   np.fromiter((s.bytes for s in steps), np.float64, n))


@dataclass
class _Timeline:
    """Cumulative busy time of each busy phase at step boundaries, for exact window overlaps."""

    knots: np.ndarray  # seconds, sorted
    cum: np.ndarray  # (3, len(knots)) cumulative seconds of each busy phase

    def __post_init__(self) -> None:
        # np.interp's slopes, computed once for every evaluation (busy_before)
        with np.errstate(divide="ignore", invalid="ignore"):  # zero-width intervals are never used
            self._slope = np.diff(self.cum, axis=1) / np.diff(self.knots)

    @classmethod
    def build(cls, steps: _Steps, t_ref_ns: int) -> "_Timeline":
        if not len(steps.t0_ns):
            return cls(np.array([0.0, 1.0]), np.zeros((3, 2)))
        order = np.argsort(steps.t0_ns, kind="stable")  # start order; ties keep their order
        t0 = (steps.t0_ns[order] - t_ref_ns) / 1e9
        t1 = (steps.t1_ns[order] - t_ref_ns) / 1e9
        # overlapping intervals (two engines on one GPU, clock-mapping jitter) are clipped to the next start,
        # so no instant counts twice
        t1 = np.minimum(t1, np.append(t0[1:], np.inf))
        t1 = np.maximum(t1, t0)
        phase = steps.phase[order]
        knots = np.empty(2 * len(t0))
        knots[0::2], knots[1::2] = t0, t1
        cum = np.zeros((3, len(knots)))
        dur = t1 - t0
        for p in range(3):
            inc = np.where(phase == p, dur, 0.0)
            ends = np.cumsum(inc)
            cum[p, 1::2] = ends
            cum[p, 0::2] = ends - inc
        return cls(knots, cum)

    def busy_before(self, t: np.ndarray) -> np.ndarray:
        """(3, *t.shape) seconds each busy phase ran before time(s) t.

        What ``np.interp(t, knots, cum[p])`` gives for each phase, to the bit: the same interval (the last
        knot <= t), slope and arithmetic, the flat ends outside the knots; but one search serves all three
        phases and any shape of ``t`` (every candidate offset at once)."""
        x = np.asarray(t, dtype=float)
        knots, cum = self.knots, self.cum
        last = len(knots) - 1
        j = np.searchsorted(knots, x, side="right") - 1
        inner = np.clip(j, 0, last - 1)
        out = self._slope[:, inner] * (x - knots[inner]) + cum[:, inner]
        out = np.where(j < 0, cum[:, :1].reshape((3,) + (1,) * x.ndim), out)
        return np.where(j >= last, cum[:, -1:].reshape((3,) + (1,) * x.ndim), out)

    def fractions(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """(..., 4) fractions of each window spent in prefill, decode, mixed, idle; windows of any shape."""
        width = np.maximum(end - start, 1e-9)
        f = np.moveaxis((self.busy_before(end) - self.busy_before(start)) / width, 0, -1)
        f = np.clip(f, 0.0, 1.0)
        total = f.sum(axis=-1)
        over = total > 1.0
        f[over] /= total[over, None]
        return np.concatenate([f, (1.0 - f.sum(axis=-1))[..., None]], axis=-1)

    def phase_at(self, t: np.ndarray) -> np.ndarray:
        """Index of the busy phase running at each time (3 = idle)."""
        eps = 1e-6
        f = self.fractions(t - eps, t + eps)
        return np.argmax(f, axis=1)


@dataclass
class FitResult:
    values: np.ndarray  # (4, m): prefill, decode, mixed, idle x metric
    stderr: np.ndarray  # (4, m)
    kept: int
    outliers: int


def _bounded_fit(F: np.ndarray, Y: np.ndarray, cfg: AttributionConfig, robust: bool) -> FitResult:
    """Per metric: u in [0,1]^4 minimising ||F u - y||, optionally dropping outlier windows and refitting."""
    n, m = Y.shape
    values = np.full((4, m), np.nan)
    stderr = np.full((4, m), np.nan)
    kept_total, out_total = 0, 0
    for j in range(m):
        y = Y[:, j]
        ok = np.isfinite(y)
        if ok.sum() < 4:
            continue
        u = lsq_linear(F[ok], y[ok], bounds=(0.0, 1.0), method="bvls").x
        if robust:
            r = y - F @ u
            med = np.median(r[ok])
            sigma = 1.4826 * np.median(np.abs(r[ok] - med))
            limit = max(cfg.outlier_k * sigma, cfg.outlier_floor)
            good = ok & (np.abs(r - med) <= limit)
            out_total += int(ok.sum() - good.sum())
            if good.sum() >= 4:
                ok = good
                u = lsq_linear(F[ok], y[ok], bounds=(0.0, 1.0), method="bvls").x
        Fk, yk = F[ok], y[ok]
        r = yk - Fk @ u
        dof = max(len(yk) - 4, 1)
        s2 = float(r @ r) / dof
        try:
            cov = s2 * np.linalg.pinv(Fk.T @ Fk)
            stderr[:, j] = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        except np.linalg.LinAlgError:
            pass
        values[:, j] = u
        kept_total = max(kept_total, len(yk))
    return FitResult(values, stderr, kept_total, out_total)


class Attributor:
    """Attributes one GPU's counter samples to the phases of its steps (``unmix`` or ``naive``)."""

    def __init__(self, config: AttributionConfig | None = None):
        self.config = config or AttributionConfig()
        #: the offset path of the last ``unmix`` pass: (chunk start s since t_ref, offset s), for inspection
        self.last_offsets: list[tuple[float, float]] = []
        #: per GPU: the signatures of the last pass, the next pass's starting point (the daemon re-attributes
        #: a sliding horizon every few seconds; starting from them skips the global offset scan)
        self._warm: dict[str, np.ndarray] = {}

    # ---------------------------------------------------------------- entry point

    def attribute(
        self,
        gpu: GpuIdentity,
        steps: Sequence[StepRecord],
        samples: Sequence[SampleRecord],
        *,
        now_ns: int | None = None,
        spec: GpuSpec | None = None,
    ) -> GpuAttribution:
        """One pass over the horizon ending at ``now_ns`` (default: the last sample or step)."""
        cfg = self.config
        result = GpuAttribution(gpu=gpu, method=cfg.method)
        uuid = gpu.uuid
        if now_ns is None:
            ends = [s.t_ns for s in samples if s.gpu_uuid == uuid] + \
                [s.t1_ns for s in steps if s.gpu_uuid == uuid]
            if not ends:
                return result
            now_ns = max(ends)
        start_ns = now_ns - int(cfg.horizon_s * 1e9)
        result.updated_ns = now_ns
        # steps a little older than the horizon still overlap its first windows
        lo_ns = start_ns - int((cfg.offset_max_ms / 1e3 + 2.0) * 1e9)
        steps = [s for s in steps if s.gpu_uuid == uuid and s.t1_ns >= lo_ns and s.t0_ns <= now_ns]
        samples = [s for s in samples if s.gpu_uuid == uuid and start_ns <= s.t_ns <= now_ns]
        cols = _Steps.of(steps)
        firsts = [s.t_ns for s in samples] + ([max(int(cols.t0_ns.min()), start_ns)] if steps else [])
        self._time_shares(result, cols, min(firsts) if firsts else start_ns, now_ns)
        self._efficiency(result, cols, spec)

        source = next((src for src in COUNTER_PREFERENCE if any(s.source == src for s in samples)), None)
        updates = sorted(
            (s for s in samples if s.source == source and any(v is not None for v in s.values.values())),
            key=lambda s: s.t_ns,
        )
        self._blended(result, samples, updates)
        result.windows = len(updates)
        if len(updates) < cfg.min_windows:
            return result  # not enough data: phases stay empty

        t_ref = updates[0].t_ns
        timeline = _Timeline.build(cols, t_ref)
        t = np.array([(s.t_ns - t_ref) / 1e9 for s in updates])
        Y = np.array([[_nan(s.values.get(k)) for k in UNMIX_KEYS] for s in updates])
        period = _refresh_period(t)

        if cfg.method == "naive":
            values, stderr, weight = self._naive(timeline, t, Y)
        else:
            values, stderr, weight, offset = self._unmix(timeline, t, Y, period, self._warm.get(gpu.uuid))
            align = [UNMIX_KEYS.index(k) for k in ALIGN_KEYS]
            if np.isfinite(values[:, align]).all():
                self._warm[gpu.uuid] = values[:, align]
            result.alignment_offset_s = -offset
        for p, phase in enumerate(BUSY):
            if weight[p] < cfg.min_phase_s:
                continue  # not enough data for this phase
            pv = PhaseValues(time_share=result.time_share.get(phase, 0.0))
            for j, key in enumerate(UNMIX_KEYS):
                if np.isfinite(values[p, j]):
                    pv.values[key] = float(values[p, j])
                    if np.isfinite(stderr[p, j]):
                        pv.uncertainty[key] = float(stderr[p, j])
            eff = result.phases.get(phase)
            if eff is not None:
                pv.mfu, pv.mbu = eff.mfu, eff.mbu
            result.phases[phase] = pv
        return result

    # ---------------------------------------------------------------- parts

    def _time_shares(self, result: GpuAttribution, steps: _Steps, start: int, end: int) -> None:
        span = max(end - start, 1)
        # integer nanoseconds, summed exactly
        inside = np.maximum(0, np.minimum(steps.t1_ns, end) - np.maximum(steps.t0_ns, start))
        busy = {p: int(inside[steps.phase == i].sum()) for i, p in enumerate(BUSY)}
        total = sum(busy.values())
        for p in BUSY:
            result.time_share[p] = busy[p] / span
        result.time_share[Phase.IDLE] = max(0.0, 1.0 - total / span)

    def _efficiency(self, result: GpuAttribution, steps: _Steps, spec: GpuSpec | None) -> None:
        """Exact MFU/MBU per phase: sum(flops) / sum(duration) / peak. Parked in ``result.phases`` for now."""
        if spec is None:
            return
        duration = (steps.t1_ns - steps.t0_ns) / 1e9
        for i, phase in enumerate(BUSY):
            mine = steps.phase == i
            # Python's sum over the step order, as a sum over the records
            seconds = sum(duration[mine].tolist())
            if seconds <= 0:
                continue
            pv = PhaseValues(time_share=result.time_share.get(phase, 0.0))
            pv.mfu = sum(steps.flops[mine].tolist()) / seconds / spec.peak_bf16_flops
            pv.mbu = sum(steps.bytes[mine].tolist()) / seconds / spec.peak_dram_bytes_per_s
            result.phases[phase] = pv

    def _blended(self, result: GpuAttribution, samples: Sequence[SampleRecord],
                 updates: Sequence[SampleRecord]) -> None:
        sums: dict[str, list[float]] = {}
        for s in list(updates) + [s for s in samples if s.source == "nvml"]:
            for key, value in s.values.items():
                if value is not None:
                    sums.setdefault(key, []).append(value)
        result.blended = {k: float(np.mean(v)) for k, v in sums.items() if k != "mem_used_bytes"}

    def _naive(self, timeline: _Timeline, t: np.ndarray, Y: np.ndarray):
        phase = timeline.phase_at(t)
        values = np.full((4, Y.shape[1]), np.nan)
        stderr = np.full((4, Y.shape[1]), np.nan)
        period = _refresh_period(t)
        weight = np.zeros(4)
        for p in range(4):
            rows = Y[phase == p]
            weight[p] = len(rows) * period
            if len(rows):
                values[p] = np.nanmean(rows, axis=0)
                stderr[p] = np.nanstd(rows, axis=0) / math.sqrt(len(rows))
        return values, stderr, weight

    def _unmix(self, timeline: _Timeline, t: np.ndarray, Y: np.ndarray, period: float,
               warm: np.ndarray | None = None):
        cfg = self.config
        align = [UNMIX_KEYS.index(k) for k in ALIGN_KEYS]
        cand = np.arange(cfg.offset_min_ms, cfg.offset_max_ms + 1e-9, cfg.offset_step_ms) / 1e3
        # fractions for every candidate offset: (k, n, 4)
        ends = t[None, :] - cand[:, None]
        Fs = timeline.fractions(ends - period, ends)
        chunk_of = np.floor((t - t[0]) / cfg.chunk_s).astype(int)
        n_chunks = int(chunk_of[-1]) + 1
        Ya = Y[:, align]

        # start: the single offset that explains the whole horizon best
        # (unbounded least squares, clipped: only a ranking is needed here, and it is fast)
        iterations = cfg.iterations
        if warm is not None:
            u, iterations = warm, max(1, cfg.iterations - 1)
        else:
            Yz = np.nan_to_num(Ya)
            best, k0 = np.inf, 0
            for k in range(len(cand)):
                coef = np.clip(np.linalg.lstsq(Fs[k], Yz, rcond=None)[0], 0.0, 1.0)
                r = float(np.mean((Fs[k] @ coef - Yz) ** 2))
                if r < best:
                    best, k0 = r, k
            u = _bounded_fit(Fs[k0], Ya, cfg, robust=True).values
        for _ in range(iterations):
            # residual of every chunk under every candidate offset, with the current signatures
            pred = Fs @ np.nan_to_num(u)  # (k, n, a)
            err = np.nanmean(np.minimum((pred - Ya[None]) ** 2, 0.05), axis=2)  # truncated: glitches bounded
            cost = np.zeros((len(cand), n_chunks))
            counts = np.zeros(n_chunks)
            for c in range(n_chunks):
                rows = chunk_of == c
                counts[c] = rows.sum()
                if rows.any():
                    cost[:, c] = err[:, rows].mean(axis=1)
            path = _track(cost, cand, period, cfg.offset_change_cost)
            offsets, segment = _smooth_offsets(cost, cand, path, period, counts)
            centres = (np.arange(n_chunks) + 0.5) * cfg.chunk_s + t[0]
            off_w = _window_offsets(t, chunk_of, centres, offsets, segment)
            F = timeline.fractions(t - off_w - period, t - off_w)
            u = _bounded_fit(F, Ya, cfg, robust=True).values
        full = _bounded_fit(F, Y, cfg, robust=True)
        weight = F.sum(axis=0) * period
        self.last_offsets = [(float(c * cfg.chunk_s), float(offsets[c])) for c in range(n_chunks)]
        return full.values, full.stderr, weight, float(off_w[-1])


def _track(cost: np.ndarray, cand: np.ndarray, period: float, change_cost: float) -> np.ndarray:
    """Viterbi over chunks: lowest total residual plus a cost per ms of offset change.

    A change of one whole refresh period (the sawtooth's wrap) costs as little as no change.
    """
    k, n = cost.shape
    ms = cand * 1e3
    d = np.abs(ms[:, None] - ms[None, :])
    d = np.minimum(d, np.abs(d - period * 1e3))
    trans = change_cost * d
    acc = cost[:, 0].copy()
    back = np.zeros((k, n), dtype=int)
    for c in range(1, n):
        tot = acc[:, None] + trans  # from i to j
        back[:, c] = np.argmin(tot, axis=0)
        acc = tot[back[:, c], np.arange(k)] + cost[:, c]
    path = np.zeros(n, dtype=int)
    path[-1] = int(np.argmin(acc))
    for c in range(n - 1, 0, -1):
        path[c - 1] = back[path[c], c]
    return path


def _smooth_offsets(cost: np.ndarray, cand: np.ndarray, path: np.ndarray, period: float,
                    counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-grid offset per chunk (parabola through the cost minimum), smoothed with a local linear fit over
    neighbouring chunks (the drift is slow and steady). A jump of about one period is the sawtooth's wrap:
    the counter windows really shift by one, so smoothing never crosses it. Returns (offsets, segment ids)."""
    k, n = cost.shape
    step = cand[1] - cand[0] if len(cand) > 1 else 0.0
    raw = cand[path].astype(float)
    sharp = np.zeros(n)
    for c in range(n):
        i = path[c]
        if 0 < i < k - 1:
            a, b, d = cost[i - 1, c], cost[i, c], cost[i + 1, c]
            curv = a - 2 * b + d
            if curv > 0:
                raw[c] += step * float(np.clip(0.5 * (a - d) / curv, -1.0, 1.0))
                sharp[c] = curv
    segment = np.concatenate([[0], np.cumsum(np.abs(np.diff(raw)) > period / 2)])
    # weight chunks by how sharply they pin the offset (single-phase chunks barely do)
    w = sharp * counts
    if w.sum() <= 0:
        return raw, segment
    w = w / w.max() + 1e-3
    out = raw.copy()
    x = np.arange(n, dtype=float)
    for c in range(n):
        sel = np.arange(max(0, c - 3), min(n, c + 4))
        sel = sel[segment[sel] == segment[c]]
        if len(sel) >= 3:
            sw = np.sqrt(w[sel])
            A = np.stack([np.ones(len(sel)), x[sel] - c], axis=1) * sw[:, None]
            out[c] = np.linalg.lstsq(A, raw[sel] * sw, rcond=None)[0][0]
    return out, segment


def _window_offsets(t: np.ndarray, chunk_of: np.ndarray, centres: np.ndarray, offsets: np.ndarray,
                    segment: np.ndarray) -> np.ndarray:
    """Per-window offset: linear between chunk centres of the same segment, the chunk's own across a wrap."""
    off = offsets[chunk_of].copy()
    for seg in np.unique(segment):
        chunks = np.flatnonzero(segment == seg)
        if len(chunks) < 2:
            continue
        rows = np.isin(chunk_of, chunks)
        off[rows] = np.interp(t[rows], centres[chunks], offsets[chunks])
    return off


def _refresh_period(t: np.ndarray) -> float:
    """Median time between counter updates (s), bounded to a sane range."""
    if len(t) < 2:
        return 0.1
    return float(np.clip(np.median(np.diff(t)), 0.02, 2.0))


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def attribution_to_dict(result: GpuAttribution) -> dict:
    """The JSON shape of ``phaselens attribute --json`` for one GPU (DESIGN.md)."""
    phases: dict[str, dict] = {}
    for phase in BUSY:
        share = result.time_share.get(phase, 0.0)
        pv = result.phases.get(phase)
        entry: dict = {"time_share": round(share, 4)}
        if pv is None or not pv.values:  # no counter values; MFU/MBU (from the steps alone) may be there
            if share > 0 or pv is not None:
                entry["status"] = "not enough data"
                if pv is not None and pv.mfu is not None:
                    entry["mfu"] = round(pv.mfu, 4)
                if pv is not None and pv.mbu is not None:
                    entry["mbu"] = round(pv.mbu, 4)
                phases[phase.value] = entry
            continue
        entry.update({k: round(v, 4) for k, v in pv.values.items()})
        entry["uncertainty"] = {k: round(v, 4) for k, v in pv.uncertainty.items()}
        if pv.mfu is not None:
            entry["mfu"] = round(pv.mfu, 4)
        if pv.mbu is not None:
            entry["mbu"] = round(pv.mbu, 4)
        phases[phase.value] = entry
    phases["idle"] = {"time_share": round(result.time_share.get(Phase.IDLE, 0.0), 4)}
    out = {
        "phases": phases,
        "blended": {k: round(v, 4) for k, v in result.blended.items()},
        "alignment_offset_ms": None if result.alignment_offset_s is None
        else round(result.alignment_offset_s * 1e3, 1),
        "windows": result.windows,
        "method": result.method,
    }
    return out
