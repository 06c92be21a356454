"""The step-time model: how long one engine step takes, fitted from the operator's own step records.

Forms (DESIGN.md, "The advisor"; DistServe, OSDI'24, section 4 and its simulator's profile tables use the
same shapes):

* prefill: ``a + b*sum(l) + c*sum(l^2 + 2*l*p)``: ``l`` the chunk length, ``p`` its cached prefix. The
  quadratic term counts the query-key pairs of causal attention (twice the pairs, less ``sum(l)``), so a
  prefix-cache hit still costs the attention of the new tokens over the cached ones.
* decode: ``a + b*context + c*batch``: ``context`` the summed attended context, ``batch`` the sequences.
  Above a batch knee (when the data shows one, e.g. a GEMM tile or attention-kernel change) a second
  line is fitted.
* mixed (a chunked-prefill step that also carries decodes): an intercept plus both sets of terms.
* launch floor (prefill and mixed): those steps run eagerly, one kernel launch at a time from the host, so a
  step with little work takes as long as the host needs to launch the forward, whatever its size (on the
  H200 8B profile: 10-17 ms for any prompt up to 512 tokens, where the GPU work alone is 5-15 ms). The
  step time is ``max(floor, line)``; the floor is searched on the prefill steps like the decode knee
  (kept only when it cuts the error over all steps by ``KNEE_GAIN``) and mixed steps take the same one
  (the same eager forward); each line is fitted on the steps above it, so a few launch-bound small steps
  no longer inflate the intercept every large step pays. Decode steps replay CUDA graphs (one launch)
  and have no floor.

Fits minimise the *relative* error (least squares on ``(pred - t) / t``), so a 5 ms decode step weighs as
much as a 500 ms prefill; coefficients are kept non-negative (a step never gets faster with more work).
The held-out mean relative error (20% of the steps, seeded) is reported per phase and drives the
advisor's decision margin. Other tensor-parallel degrees are extrapolated by a roofline rule and flagged,
and with no trace at all a roofline model from the model config and the GPU's datasheet peaks stands in,
flagged as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import nnls

from phaselens.advisor.host_gap import HostGap
from phaselens.engine.config import ModelConfig
from phaselens.gpus import GpuSpec
from phaselens.phase import Phase
from phaselens.trace import StepRecord

log = logging.getLogger(__name__)

#: Steps each fitted phase needs: 4 per coefficient, so a holdout of 20% still leaves an overdetermined fit.
MIN_STEPS_PER_PHASE = 12
HOLDOUT_FRACTION = 0.2
#: A second decode line is used only when it cuts the relative RMS error by this factor or more.
KNEE_GAIN = 0.8
#: Outlier steps (warm-up, a shape's first run, a host stall inside the interval): a relative residual more
#: than 3.5 robust standard deviations (1.4826 x MAD) from the median one, Iglewicz and Hoaglin's modified
#: z-score rule (1993), and at least OUTLIER_MIN_REL off the model.
OUTLIER_SDS = 3.5
OUTLIER_MIN_REL = 0.10
#: Roofline efficiencies for the fallback: sustained fraction of datasheet peak (typical for bf16 GEMMs
#: and streaming reads on Hopper/Ampere; they are assumptions, and the model says so).
ROOFLINE_MFU = 0.6
ROOFLINE_MBU = 0.8
#: Per all-reduce latency and per-GPU NVLink bandwidth used to extrapolate to other TP degrees.
ALLREDUCE_LATENCY_S = 8e-6
NVLINK_BYTES_PER_S = 300e9


class NotEnoughStepsError(ValueError):
    """The trace has too few steps of a phase to fit its coefficients."""


@dataclass(frozen=True)
class Line3:
    """``a + b*x + c*y`` with its meaning in the caller (seconds)."""

    a: float
    b: float
    c: float

    def scaled(self, fa: float, fb: float, fc: float) -> "Line3":
        return Line3(self.a * fa, self.b * fb, self.c * fc)


@dataclass(frozen=True)
class StepCoefficients:
    """Coefficients of one instance shape (a TP degree), seconds.

    prefill: ``a + b*sum(l) + c*sum(l^2 + 2 l p)``; decode: ``a + b*context + c*batch`` (``decode_large``
    above ``knee``); mixed: ``mixed_a + prefill terms + decode terms`` (``mixed`` holds the five fitted
    coefficients when mixed steps were fitted, else the prefill and decode lines are composed).
    """

    tp: int
    prefill: Line3
    decode: Line3
    decode_large: Line3 | None = None
    knee: int | None = None
    #: what the knee splits on: the decode batch, or the summed context (tokens)
    knee_on: str = "batch"
    mixed: tuple[float, float, float, float, float] | None = None
    #: launch floors (s) of eager prefill and mixed steps: no such step is shorter (0: none)
    prefill_floor: float = 0.0
    mixed_floor: float = 0.0
    #: "fit", "published", "roofline", or "extrapolated from TP1 fit" (how these numbers were obtained)
    source: str = "fit"
    #: host time before each step (the GPU intervals above do not include it); zero unless fitted
    host: HostGap = field(default_factory=HostGap)
    #: mean prefill tokens of the fitted prefill and mixed steps (0: not fitted); where the fit is pinned
    prefill_tokens_mean: float = 0.0
    mixed_tokens_mean: float = 0.0

    def prefill_time(self, sum_l: float, sum_quad: float) -> float:
        p = self.prefill
        return _floored(p.a + p.b * sum_l + p.c * sum_quad, self.prefill_floor)

    def decode_line(self, batch: float, context: float = 0.0) -> Line3:
        if self.decode_large is not None and self.knee is not None:
            if (batch if self.knee_on == "batch" else context) >= self.knee:
                return self.decode_large
        return self.decode

    def decode_time(self, batch: float, context: float) -> float:
        if batch <= 0:
            return 0.0
        d = self.decode_line(batch, context)
        return d.a + d.b * context + d.c * batch

    def mixed_time(self, sum_l: float, sum_quad: float, batch: float, context: float) -> float:
        """A step with prefill chunks and ``batch`` decodes over ``context`` summed decode context."""
        if batch <= 0:
            return self.prefill_time(sum_l, sum_quad)
        if sum_l <= 0:
            return self.decode_time(batch, context)
        if self.mixed is not None:
            a, bp, cp, bd, cd = self.mixed
            return _floored(a + bp * sum_l + cp * sum_quad + bd * context + cd * batch, self.mixed_floor)
        d = self.decode_line(batch, context)
        p = self.prefill
        return _floored(max(p.a, d.a) + p.b * sum_l + p.c * sum_quad + d.b * context + d.c * batch,
                        self.prefill_floor)

    # Step cadence: the host gap before a step plus its GPU time (an engine steps back to back, so this is
    # the time between two steps' outputs). The simulator and the screen plan with these.

    def decode_step(self, batch: float, context: float) -> float:
        """Cadence of a decode step: host gap plus GPU time."""
        if batch <= 0:
            return 0.0
        return self.host.before(Phase.DECODE, batch) + self.decode_time(batch, context)

    def prefill_step(self, sum_l: float, sum_quad: float, seqs: float = 1.0) -> float:
        """Cadence of a prefill-only step of ``seqs`` prompts: host gap plus GPU time."""
        return self.host.before(Phase.PREFILL, seqs) + self.prefill_time(sum_l, sum_quad)

    def mixed_step(self, sum_l: float, sum_quad: float, batch: float, context: float,
                   prefill_seqs: float = 1.0) -> float:
        """Cadence of a step with prefill chunks of ``prefill_seqs`` prompts and ``batch`` decodes."""
        if batch <= 0:
            return self.prefill_step(sum_l, sum_quad, prefill_seqs)
        if sum_l <= 0:
            return self.decode_step(batch, context)
        host = self.host.before(Phase.MIXED, batch + prefill_seqs)
        return host + self.mixed_time(sum_l, sum_quad, batch, context)


def _floored(t: Any, floor: float) -> Any:
    """``max(t, floor)`` for a number or an array."""
    if isinstance(t, np.ndarray):
        return np.maximum(t, floor)
    return t if t >= floor else floor


def quad_term(lengths: np.ndarray, cached: np.ndarray | float = 0.0) -> np.ndarray:
    """``l^2 + 2 l p`` per sequence (the prefill model's quadratic feature)."""
    lengths = np.asarray(lengths, dtype=float)
    return lengths * lengths + 2.0 * lengths * np.asarray(cached, dtype=float)


@dataclass(frozen=True)
class StepModel:
    """Step-time coefficients per TP degree, with how well they fit and where they came from."""

    by_tp: dict[int, StepCoefficients]
    #: held-out mean relative error per phase name ("prefill", "decode", "mixed"); empty when not fitted
    holdout_error: dict[str, float] = field(default_factory=dict)
    #: steps used per phase
    steps_used: dict[str, int] = field(default_factory=dict)
    measured_tp: int = 1
    #: human-readable flags: roofline fallback, extrapolated TP degrees, approximations used
    flags: tuple[str, ...] = ()

    # ------------------------------------------------------------------ use

    def coefficients(self, tp: int) -> StepCoefficients:
        """Coefficients for TP degree ``tp``, extrapolating from the measured one when needed (flagged)."""
        if tp in self.by_tp:
            return self.by_tp[tp]
        raise KeyError(f"no step-time coefficients for TP{tp}; have TP{sorted(self.by_tp)}")

    @property
    def tp_degrees(self) -> list[int]:
        return sorted(self.by_tp)

    @property
    def error(self) -> float:
        """The model's own error: the worse of the prefill and decode held-out errors on steps that are not
        outliers (0 when unknown); the errors over all steps are in ``holdout_error`` as ``*_all_steps``."""
        vals = [v for k, v in self.holdout_error.items() if k in ("prefill", "decode")]
        return max(vals) if vals else 0.0

    def with_tp_degrees(
        self, degrees: Iterable[int], model: ModelConfig | None, dtype_bytes: int = 2
    ) -> "StepModel":
        """A copy that also holds the TP degrees in ``degrees``, extrapolated from the measured TP."""
        base = self.by_tp.get(self.measured_tp) or self.by_tp[min(self.by_tp)]
        by_tp = dict(self.by_tp)
        new = []
        for tp in degrees:
            if tp in by_tp:
                continue
            by_tp[tp] = extrapolate_tp(base, tp, model, dtype_bytes)
            new.append(tp)
        flags = self.flags
        if new:
            flags = flags + (
                f"TP{','.join(map(str, new))} extrapolated from TP{base.tp} by roofline scaling "
                "(compute and KV reads split across GPUs, plus all-reduce time)",
            )
        return replace(self, by_tp=by_tp, flags=flags)

    def with_peak_floor(self, model: ModelConfig, gpu: GpuSpec) -> "StepModel":
        """A copy whose prefill cost per token (of prefill steps and of mixed steps) is physically possible.

        A trace whose prefill steps all have about the same length cannot separate a step's fixed cost from
        its cost per token: the fit may put everything in the intercept and predict that longer prompts cost
        nothing (a GPU demo's narrow trace did: "adds 0.0 ms of prefill", 98.7 req/s per GPU). No GPU
        prefills faster than its peak FLOP rate (the projections' 2 FLOPs per weight per token, split over
        the TP group). A slope below that was not measured, so the roofline fallback's slope stands in for it
        (the same FLOPs at ``ROOFLINE_MFU`` of the peak), flagged. The intercept gives back what the steeper
        slope adds at the fitted steps' mean length (no lower than zero), so the model still predicts the
        steps it was fitted on: otherwise a batch of prompts in one step would share an intercept that is
        really per-token work."""
        by_tp = dict(self.by_tp)
        raised = []
        for tp, co in self.by_tp.items():
            at_peak = _projection_flops_per_token(model) / (gpu.peak_bf16_flops * tp)
            roofline = at_peak / ROOFLINE_MFU
            if co.prefill.b < at_peak:
                a = max(0.0, co.prefill.a - (roofline - co.prefill.b) * co.prefill_tokens_mean)
                raised.append(f"TP{tp} prefill {co.prefill.b * 1e6:.3g} -> {roofline * 1e6:.3g} us/token")
                co = replace(co, prefill=replace(co.prefill, a=a, b=roofline))
            # a mixed step's prefill tokens (a colocated GPU's chunked prefill) likewise
            if co.mixed is not None and co.mixed[1] < at_peak:
                raised.append(f"TP{tp} mixed {co.mixed[1] * 1e6:.3g} -> {roofline * 1e6:.3g} "
                              "us/prefill token")
                a = max(0.0, co.mixed[0] - (roofline - co.mixed[1]) * co.mixed_tokens_mean)
                co = replace(co, mixed=(a, roofline, *co.mixed[2:]))
            by_tp[tp] = co
        if not raised:
            return self
        return replace(self, by_tp=by_tp, flags=self.flags + (
            f"prefill cost per token below what {gpu.name}'s peak "
            f"({gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s) allows: not resolved by the trace's prompt lengths; "
            f"the roofline's slope (MFU {ROOFLINE_MFU:.0%} assumed) stands in ({'; '.join(raised)}); "
            "profile a spread of prompt lengths (bench/profile_steps.py)",))

    @property
    def host(self) -> HostGap:
        """The host gap of the measured instance shape (every TP degree carries the same one)."""
        return (self.by_tp.get(self.measured_tp) or self.by_tp[min(self.by_tp)]).host

    def with_serving_overhead(self, per_step_s: float, note: str) -> "StepModel":
        """A copy whose every step also pays ``per_step_s`` and the per-sequence serving part
        (:meth:`HostGap.with_serving`); ``note`` says where the figure came from (a flag)."""
        by_tp = {tp: replace(co, host=co.host.with_serving(per_step_s, note))
                 for tp, co in self.by_tp.items()}
        return replace(self, by_tp=by_tp, flags=self.flags + (note,))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "holdout_mean_relative_error": dict(self.holdout_error),
            "steps_used": dict(self.steps_used),
            "measured_tp": self.measured_tp,
            "flags": list(self.flags),
            "tp": {},
        }
        for tp, co in sorted(self.by_tp.items()):
            out["tp"][str(tp)] = {
                "source": co.source,
                "prefill_s": [co.prefill.a, co.prefill.b, co.prefill.c],
                "decode_s": [co.decode.a, co.decode.b, co.decode.c],
                "decode_large_s": (
                    None
                    if co.decode_large is None
                    else [co.decode_large.a, co.decode_large.b, co.decode_large.c]
                ),
                "knee": co.knee,
                "mixed_s": None if co.mixed is None else list(co.mixed),
                "prefill_floor_s": co.prefill_floor,
                "mixed_floor_s": co.mixed_floor,
                "host_gap": co.host.to_dict(),
            }
        return out

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_table(
        cls,
        table: dict[int, dict[str, Any]],
        *,
        unit_s: float = 1.0,
        source: str = "published",
        flags: Sequence[str] = (),
    ) -> "StepModel":
        """From a coefficient table ``{tp: {"prefill": [a,b,c], "decode": [a,b,c],
        "decode_large": [a,b,c] | None, "knee": int | None}}``; ``unit_s`` converts (1e-3 for ms)."""
        by_tp = {}
        for tp, row in table.items():
            big = row.get("decode_large")
            by_tp[int(tp)] = StepCoefficients(
                tp=int(tp),
                prefill=Line3(*(float(x) * unit_s for x in row["prefill"])),
                decode=Line3(*(float(x) * unit_s for x in row["decode"])),
                decode_large=None if big is None else Line3(*(float(x) * unit_s for x in big)),
                knee=row.get("knee"),
                source=source,
            )
        return cls(by_tp=by_tp, measured_tp=min(by_tp), flags=tuple(flags))

    @classmethod
    def roofline(
        cls, model: ModelConfig, gpu: GpuSpec, tp_degrees: Sequence[int] = (1,), dtype_bytes: int = 2
    ) -> "StepModel":
        """A model from the shape and the GPU's datasheet peaks only: no measurement, flagged as such."""
        base = roofline_coefficients(model, gpu, dtype_bytes)
        by_tp = {1: base}
        for tp in tp_degrees:
            if tp != 1:
                by_tp[tp] = replace(extrapolate_tp(base, tp, model, dtype_bytes), source="roofline")
        flag = (
            f"roofline model from {model.name} shape and {gpu.name} datasheet peaks "
            f"(MFU {ROOFLINE_MFU:.0%}, MBU {ROOFLINE_MBU:.0%} assumed): not measured"
        )
        return cls(by_tp=by_tp, measured_tp=1, flags=(flag,))

    @classmethod
    def fit(
        cls,
        steps: Sequence[StepRecord],
        *,
        model: ModelConfig | None = None,
        tp: int = 1,
        seed: int = 0,
        source: str = "trace",
    ) -> "StepModel":
        """Fit prefill, decode and (when present) mixed coefficients from step records.

        Raises :class:`NotEnoughStepsError` ("not enough steps to fit: N, need M") when a phase has too few.
        """
        data = _StepData.from_records(steps, model)
        flags: list[str] = []
        if data.approximated_quad:
            flags.append(
                f"{data.approximated_quad} multi-sequence prefill steps: sum(l^2 + 2lp) taken from "
                "the step's attention FLOPs or, without a model config, from equal-length sequences"
            )
        for phase_name, n in (("prefill", len(data.prefill_y)), ("decode", len(data.decode_y))):
            if n < MIN_STEPS_PER_PHASE:
                raise NotEnoughStepsError(
                    f"not enough steps to fit: {n}, need {MIN_STEPS_PER_PHASE} ({phase_name} steps in "
                    f"{source}; "
                    f"{len(steps)} step records in all)"
                )
        rng = np.random.default_rng(seed)
        errors: dict[str, float] = {}

        pre = _fit_phase(data.prefill_x, data.prefill_y, rng, floor_search=True)
        dec = _fit_phase(data.decode_x, data.decode_y, rng, knee_search=True)
        fits = {"prefill": pre, "decode": dec}
        mixed = None
        if len(data.mixed_y) >= MIN_STEPS_PER_PHASE:
            # the same eager forward as a prefill step, a few decode rows more: the same launch floor
            mix = _fit_phase(data.mixed_x, data.mixed_y, rng, floor=pre.fit.floor)
            fits["mixed"] = mix
            a, bp, cp, bd, cd = (float(v) for v in mix.fit.small)
            mixed = (a, bp, cp, bd, cd)
        elif len(data.mixed_y):
            flags.append(
                f"only {len(data.mixed_y)} mixed steps: mixed steps modelled as prefill + decode terms"
            )
        for name, f in fits.items():
            errors[name] = f.holdout_error
            errors[name + "_all_steps"] = f.holdout_error_all
            if f.outliers:
                n = len(f.fit.inliers)
                flags.append(
                    f"{name}: {f.outliers} of {n} steps ({f.outliers / n:.0%}) are outliers (modified "
                    "z-score over "
                    f"{OUTLIER_SDS:g} and over {OUTLIER_MIN_REL:.0%} off the model; median "
                    f"{f.outlier_ratio:.2f}x "
                    "the model: warm-up, first run of a shape, host stalls inside the interval); left out "
                    "of the "
                    f"fit; all {name} steps together took {f.time_ratio_all:.2f}x the model's time"
                )
        for name, f in fits.items():
            if f.fit.floor:
                below = int((f.fit.predict_line(f.x) < f.fit.floor).sum())
                flags.append(
                    f"{name}: launch floor {f.fit.floor * 1e3:.1f} ms (eager steps; {below} of {len(f.x)} "
                    "steps have less work than the host takes to launch them)"
                )
        d_large = dec.fit.large if dec.fit.knee is not None else None
        co = StepCoefficients(
            tp=tp,
            prefill=Line3(*map(float, pre.fit.small)),
            decode=Line3(*map(float, dec.fit.small)),
            decode_large=None if d_large is None else Line3(*map(float, d_large)),
            knee=dec.fit.knee,
            knee_on="batch" if dec.fit.col == 2 else "context",
            mixed=mixed,
            prefill_floor=pre.fit.floor,
            mixed_floor=fits["mixed"].fit.floor if "mixed" in fits else 0.0,
            source="fit",
            host=HostGap.fit(steps),
            prefill_tokens_mean=float(data.prefill_x[:, 1].mean()),
            mixed_tokens_mean=float(data.mixed_x[:, 1].mean()) if mixed is not None else 0.0,
        )
        if co.host.fitted:
            flags.append(co.host.describe())
        else:
            flags.append("no back-to-back step pairs in the trace: host time between steps not modelled")
        used = {"prefill": len(data.prefill_y), "decode": len(data.decode_y), "mixed": len(data.mixed_y)}
        return cls(by_tp={tp: co}, holdout_error=errors, steps_used=used, measured_tp=tp, flags=tuple(flags))


# ---------------------------------------------------------------------- features


@dataclass
class _StepData:
    prefill_x: np.ndarray
    prefill_y: np.ndarray
    decode_x: np.ndarray
    decode_y: np.ndarray
    mixed_x: np.ndarray
    mixed_y: np.ndarray
    approximated_quad: int = 0

    @classmethod
    def from_records(cls, steps: Sequence[StepRecord], model: ModelConfig | None) -> "_StepData":
        px, py, dx, dy, mx, my = [], [], [], [], [], []
        approx = 0
        for s in steps:
            t = s.duration_s
            if t <= 0:
                continue  # a zero-length interval carries no timing information
            if s.phase is Phase.PREFILL and s.prefill_tokens > 0:
                quad, approximated = _prefill_quad(s, model, n_seqs=max(1, s.batch))
                approx += approximated
                px.append((1.0, s.prefill_tokens, quad))
                py.append(t)
            elif s.phase is Phase.DECODE and s.decode_tokens > 0:
                dx.append((1.0, s.context_tokens, s.decode_tokens))
                dy.append(t)
            elif s.phase is Phase.MIXED and s.prefill_tokens > 0 and s.decode_tokens > 0:
                n_pre = max(1, s.batch - s.decode_tokens)
                quad, dec_ctx = _mixed_terms(s, model, n_pre)
                mx.append((1.0, s.prefill_tokens, quad, dec_ctx, s.decode_tokens))
                my.append(t)

        def arr(rows: list, width: int) -> np.ndarray:
            return np.asarray(rows, dtype=float).reshape(-1, width)

        return cls(arr(px, 3), np.asarray(py), arr(dx, 3), np.asarray(dy), arr(mx, 5), np.asarray(my), approx)


def _mixed_terms(s: StepRecord, model: ModelConfig | None, n_pre: int) -> tuple[float, float]:
    """``(sum(l^2 + 2 l p), decode context)`` of a mixed step.

    The record's context sums the prefill chunks' ``p + l`` and the decodes' contexts, so the two are not
    apart in it. With one prefill chunk and the model shape they are recovered from the step's FLOPs
    (serving_shim/cost.py): the attention pairs ``l p + l (l+1)/2 + D`` and the context ``p + l + D`` give
    ``p (l - 1) = pairs - context + l - l (l+1)/2``. (The LM head's FLOPs depend on whether the chunk ends
    its prompt; both readings are tried and the one giving a whole, in-range ``p`` kept.) A chunk's prefix
    then costs attention, not decode context (a later chunk of a long prompt is slower than the first).
    Otherwise: no prefix, each chunk ``l / n_pre`` long, the rest of the context the decodes'.
    """
    total_l = float(s.prefill_tokens)
    fallback = total_l * total_l / n_pre, float(max(0, s.context_tokens - s.prefill_tokens))
    if model is None or s.flops <= 0 or n_pre != 1 or s.prefill_tokens < 2:
        return fallback
    h, L = model.hidden_size, model.num_layers
    linear = h * (model.q_size + 2 * model.kv_size) + model.q_size * h + 3 * h * model.intermediate_size
    tokens = s.prefill_tokens + s.decode_tokens
    best: tuple[float, float] | None = None
    for sampling in (s.decode_tokens + 1, s.decode_tokens):
        attn = s.flops - 2.0 * tokens * L * linear - 2.0 * sampling * h * model.vocab_size
        pairs = attn / (4.0 * L * model.q_size)
        p = (pairs - s.context_tokens + total_l - total_l * (total_l + 1) / 2) / (total_l - 1)
        dec_ctx = s.context_tokens - p - total_l
        err = abs(p - round(p))
        if p > -0.5 and dec_ctx >= s.decode_tokens - 0.5 and (best is None or err < best[0]):
            best = (err, max(0.0, round(p)))
    if best is None or best[0] > 0.05:
        return fallback
    p = best[1]
    return total_l * total_l + 2.0 * total_l * p, float(s.context_tokens - p - total_l)


def _prefill_quad(s: StepRecord, model: ModelConfig | None, n_seqs: int) -> tuple[float, int]:
    """``sum(l^2 + 2 l p)`` of a prefill step and whether it had to be approximated."""
    total_l = float(s.prefill_tokens)
    total_p = max(0.0, float(s.context_tokens) - total_l)  # context is sum(p + l) over the chunks
    if n_seqs == 1:
        return total_l * total_l + 2.0 * total_l * total_p, 0
    # Equal lengths give the smallest possible sum; exact when the batch is uniform.
    equal = (total_l * total_l + 2.0 * total_l * total_p) / n_seqs
    if model is not None and s.flops > 0:
        # serving_shim/cost.py: flops = 2*T*L*linear + 2*S*h*V + 4*L*q*pairs, pairs = (sum(l^2+2lp) + sum l)/2
        h, L = model.hidden_size, model.num_layers
        linear = h * (model.q_size + 2 * model.kv_size) + model.q_size * h + 3 * h * model.intermediate_size
        tokens = s.prefill_tokens + s.decode_tokens
        attn = s.flops - 2.0 * tokens * L * linear - 2.0 * n_seqs * h * model.vocab_size
        pairs = attn / (4.0 * L * model.q_size)
        from_flops = 2.0 * pairs - total_l
        upper = total_l * total_l + 2.0 * total_l * total_p
        return float(min(max(from_flops, equal), upper)), 1
    return equal, 1


# ---------------------------------------------------------------------- fitting


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error: minimise sum(((x @ c) - y) / y)^2."""
    w = 1.0 / y
    xs = x * w[:, None]
    # Column scaling keeps NNLS well conditioned (features span 1 .. 1e8).
    scale = np.maximum(np.abs(xs).max(axis=0), 1e-30)
    coef, _ = nnls(xs / scale, np.ones_like(y), maxiter=50 * x.shape[1])
    return coef / scale


def _rel_err(x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> np.ndarray:
    return np.abs(x @ coef - y) / y


def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.permutation(n)
    n_hold = max(1, int(round(n * HOLDOUT_FRACTION)))
    return idx[n_hold:], idx[:n_hold]


def _outlier_threshold(rel: np.ndarray) -> float:
    """Distance of a relative residual from the median one beyond which a step is an outlier."""
    if not len(rel):
        return OUTLIER_MIN_REL
    scale = 1.4826 * float(np.median(np.abs(rel - np.median(rel))))
    return max(OUTLIER_MIN_REL, OUTLIER_SDS * scale)


class _Piecewise:
    """One line, or two split at a decode batch knee; fitted robustly (outliers trimmed, then refitted)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, knee: int | None, split_col: int = 2,
                 floor: float = 0.0):
        self.knee = knee
        self.col = split_col
        self.floor = floor
        mask = np.ones(len(rows), bool)
        for _ in range(6):
            self._fit(x[rows[mask]], y[rows[mask]])
            rel = self.rel(x[rows], y[rows])
            self.threshold = _outlier_threshold(rel[mask])
            self.center = float(np.median(rel[mask]))
            new = np.abs(rel - self.center) <= self.threshold
            if new.sum() < max(4, len(rows) // 2) or (new == mask).all():
                break
            mask = new
        self.inliers = mask

    def _fit(self, x: np.ndarray, y: np.ndarray) -> None:
        if self.floor:
            # the line from the steps clearly above the floor; those at it say only where the floor is
            above = y > self.floor * (1.0 + OUTLIER_MIN_REL)
            if above.sum() >= 2 * x.shape[1]:
                x, y = x[above], y[above]
        if self.knee is None:
            self.small, self.large = _nnls_relative(x, y), None
            return
        lo = x[:, self.col] < self.knee
        self.small = _nnls_relative(x[lo], y[lo])
        self.large = _nnls_relative(x[~lo], y[~lo]) if (~lo).any() else self.small

    def predict_line(self, x: np.ndarray) -> np.ndarray:
        pred = x @ self.small
        if self.knee is not None and self.large is not None:
            above = x[:, self.col] >= self.knee
            pred[above] = x[above] @ self.large
        return pred

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(self.predict_line(x), self.floor)

    def rel(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (self.predict(x) - y) / y

    def inlier(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.abs(self.rel(x, y) - self.center) <= self.threshold

    def rms(self, x: np.ndarray, y: np.ndarray) -> float:
        rel = self.rel(x, y)
        return float(np.sqrt(np.mean(rel[self.inlier(x, y)] ** 2)))


@dataclass
class _PhaseFit:
    fit: _Piecewise
    holdout_error: float
    outliers: int
    #: held-out mean relative error over every held-out step, outliers included
    holdout_error_all: float
    #: median measured/model time of the outlier steps, and total measured/model time over all steps
    outlier_ratio: float
    time_ratio_all: float
    #: the features the fit saw
    x: np.ndarray


def _fit_phase(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *, knee_search: bool = False,
    floor_search: bool = False, floor: float = 0.0,
) -> _PhaseFit:
    """Fit on 80% (robustly), score the held-out 20% (its own outliers excluded and counted), refit on all.
    ``floor``: a launch floor known already; ``floor_search``: look for one."""
    train, hold = _split(len(y), rng)
    knee: int | None = None
    knee_col = 2
    pf = _Piecewise(x, y, train, None, floor=floor)
    if knee_search:
        best = pf.rms(x[train], y[train])
        # a knee in batch (kernel or tile change) or in total context (weight-read bound below it, KV-read
        # bound above: decode is a roofline max, two lines approximate it)
        for col in (2, 1):
            vals = x[train, col]
            distinct = np.unique(vals)
            if len(distinct) < 6:
                continue
            for q in np.linspace(0.1, 0.9, 17):
                k = int(np.quantile(distinct, q))
                lo = int((vals < k).sum())
                if lo < 6 or len(train) - lo < 6:
                    continue
                cand = _Piecewise(x, y, train, k, split_col=col)
                err = cand.rms(x[train], y[train])
                if err < best * KNEE_GAIN:
                    best, knee, knee_col, pf = err, k, col, cand
    if floor_search:
        # over every training step, outliers included: without a floor the launch-bound steps are the
        # outliers, so an error over the inliers alone would not see what the floor fixes
        best = _all_steps_error(pf, x[train], y[train])
        for q in np.linspace(0.05, 0.5, 10):
            f = float(np.quantile(y[train], q))
            cand = _Piecewise(x, y, train, None, floor=f)
            err = _all_steps_error(cand, x[train], y[train])
            if err < best * KNEE_GAIN:
                best, floor, pf = err, f, cand
    rel = np.abs(pf.rel(x[hold], y[hold]))
    keep = pf.inlier(x[hold], y[hold])
    hold_err = float(rel[keep].mean()) if keep.any() else float(rel.mean())
    full = _Piecewise(x, y, np.arange(len(y)), knee, split_col=knee_col, floor=floor)
    pred = full.predict(x)
    out = ~full.inliers
    ratio = float(np.median(y[out] / pred[out])) if out.any() else 1.0
    return _PhaseFit(full, hold_err, int(out.sum()), float(rel.mean()), ratio, float(y.sum() / pred.sum()), x)


def _all_steps_error(fit: _Piecewise, x: np.ndarray, y: np.ndarray) -> float:
    """Mean relative error over every step, the worst 5% (stalls, first runs) set aside."""
    rel = np.sort(np.abs(fit.rel(x, y)))
    return float(rel[: max(1, int(np.ceil(0.95 * len(rel))))].mean())


# ---------------------------------------------------------------------- roofline and TP


def _weight_bytes(model: ModelConfig, dtype_bytes: int) -> float:
    return float(model.num_parameters() * dtype_bytes)


def _projection_flops_per_token(model: ModelConfig) -> float:
    """FLOPs of one token through every layer's projections (q/k/v, o, gate/up/down): 2 per weight."""
    h = model.hidden_size
    linear = h * (model.q_size + 2 * model.kv_size) + model.q_size * h + 3 * h * model.intermediate_size
    return 2.0 * model.num_layers * linear


def roofline_coefficients(model: ModelConfig, gpu: GpuSpec, dtype_bytes: int = 2) -> StepCoefficients:
    """TP1 coefficients from FLOPs and bytes at assumed sustained fractions of the datasheet peaks."""
    flops_s = gpu.peak_bf16_flops * ROOFLINE_MFU
    bytes_s = gpu.peak_dram_bytes_per_s * ROOFLINE_MBU
    h, L = model.hidden_size, model.num_layers
    weights_t = _weight_bytes(model, dtype_bytes) / bytes_s
    per_token = _projection_flops_per_token(model) / flops_s
    # attention: 4*L*q FLOPs per query-key pair; pairs ~ sum(l^2 + 2lp)/2
    per_quad = 2.0 * L * model.q_size / flops_s
    kv_per_ctx = model.kv_bytes_per_token(dtype_bytes) / bytes_s
    lm_head = 2.0 * h * model.vocab_size / flops_s
    return StepCoefficients(
        tp=1,
        # Prefill is compute-bound: the weight read overlaps and sets only the floor (the intercept).
        prefill=Line3(weights_t, per_token, per_quad),
        # Decode is memory-bound: weights once per step, KV per context token, a little compute per sequence.
        decode=Line3(weights_t, kv_per_ctx, per_token + lm_head),
        source="roofline",
    )


def extrapolate_tp(
    base: StepCoefficients, tp: int, model: ModelConfig | None, dtype_bytes: int = 2
) -> StepCoefficients:
    """Coefficients at TP ``tp`` from TP ``base.tp``: the work splits across GPUs, plus all-reduces.

    Megatron-style TP does two all-reduces of ``tokens * hidden`` activations per layer; a ring all-reduce
    moves ``2 (t-1)/t`` of the buffer over each GPU's NVLink.
    """
    if tp == base.tp:
        return base
    f = base.tp / tp
    layers = model.num_layers if model else 32
    hidden = model.hidden_size if model else 4096
    lat = 2 * layers * ALLREDUCE_LATENCY_S if tp > 1 else 0.0
    comm_per_token = 0.0
    if tp > 1:
        comm_per_token = 2 * layers * hidden * dtype_bytes * 2 * (tp - 1) / tp / NVLINK_BYTES_PER_S
    # Fixed per-step costs (launches, scheduling) do not split; half the intercept is taken as such.
    pa = base.prefill.a * (0.5 + 0.5 * f) + lat
    prefill = Line3(pa, base.prefill.b * f + comm_per_token, base.prefill.c * f)

    # KV reads split over the GPUs only as far as the KV heads do: past one head a GPU, heads replicate
    f_kv = f * kv_replication(model, tp) / kv_replication(model, base.tp) if model else f

    def dec(line: Line3) -> Line3:
        return Line3(line.a * (0.5 + 0.5 * f) + lat, line.b * f_kv, line.c * f + comm_per_token)

    mixed = None
    if base.mixed is not None:
        a, bp, cp, bd, cd = base.mixed
        mixed = (a * (0.5 + 0.5 * f) + lat, bp * f + comm_per_token, cp * f, bd * f_kv,
                 cd * f + comm_per_token)
    return StepCoefficients(
        tp=tp,
        prefill=prefill,
        decode=dec(base.decode),
        decode_large=None if base.decode_large is None else dec(base.decode_large),
        # a context knee (weight-read bound below, KV-read bound above) moves out as the KV splits over GPUs
        knee=None if base.knee is None else (base.knee if base.knee_on == "batch" else int(base.knee / f)),
        knee_on=base.knee_on,
        mixed=mixed,
        source=f"extrapolated from TP{base.tp} {base.source}",
        # the host work per step is the engine's, not the GPUs': the same at any TP degree
        host=base.host,
        prefill_tokens_mean=base.prefill_tokens_mean,
        mixed_tokens_mean=base.mixed_tokens_mean,
    )


def kv_replication(model: ModelConfig, tp: int) -> float:
    """How many copies of each KV head an instance of ``tp`` GPUs keeps: 1 while the KV heads divide over the
    GPUs, ``tp / num_kv_heads`` once there are fewer heads than GPUs (each GPU then holds one head, as vLLM
    replicates them; :func:`~phaselens.advisor.inputs.tp_problem` says which TP degrees are possible)."""
    return max(1.0, tp / model.num_kv_heads)


def kv_capacity_tokens(
    model: ModelConfig, gpu: GpuSpec, tp: int, dtype_bytes: int = 2, memory_utilization: float = 0.9
) -> int:
    """KV-cache tokens an instance of ``tp`` GPUs holds once its weights are loaded (replicated KV heads
    take their room on every GPU that holds them)."""
    free = gpu.memory_bytes * tp * memory_utilization - _weight_bytes(model, dtype_bytes)
    return max(0, int(free // (model.kv_bytes_per_token(dtype_bytes) * kv_replication(model, tp))))


def fits_in_memory(model: ModelConfig, gpu: GpuSpec, tp: int, dtype_bytes: int = 2) -> bool:
    """Whether the weights fit on ``tp`` GPUs with room for at least one full-length request's KV."""
    return kv_capacity_tokens(model, gpu, tp, dtype_bytes) >= min(model.max_position_embeddings, 4096)


def mean_relative_error(model: StepCoefficients, steps: Sequence[StepRecord]) -> dict[str, float]:
    """Mean relative error of ``model`` on ``steps``, per phase (for reports and benchmarks)."""
    data = _StepData.from_records(steps, None)
    out: dict[str, float] = {}
    if len(data.prefill_y):
        pred = np.array([model.prefill_time(r[1], r[2]) for r in data.prefill_x])
        out["prefill"] = float(np.mean(np.abs(pred - data.prefill_y) / data.prefill_y))
    if len(data.decode_y):
        pred = np.array([model.decode_time(r[2], r[1]) for r in data.decode_x])
        out["decode"] = float(np.mean(np.abs(pred - data.decode_y) / data.decode_y))
    return out


__all__ = [
    "StepModel",
    "StepCoefficients",
    "Line3",
    "NotEnoughStepsError",
    "quad_term",
    "kv_capacity_tokens",
    "kv_replication",
    "fits_in_memory",
    "roofline_coefficients",
    "extrapolate_tp",
    "mean_relative_error",
    "MIN_STEPS_PER_PHASE",
]
