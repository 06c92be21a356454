"""Goodput search and the decision: screen everything, simulate the finalists, decide with reasons.

Pipeline (DESIGN.md, "The advisor"): the closed-form :class:`Screen` ranks every split, colocated chunk
budget and conditional threshold; the best few of each kind are simulated (:class:`Simulator`) and their
goodput, the highest request rate whose TTFT and TPOT percentiles meet the SLO, is found by binary search
for several seeds. The decision rule (issue 5): recommend ``split`` only if its goodput per GPU beats the
best colocated one by more than ``max(15%, 2 x the step model's held-out error)`` *and* still does when the
request rate and the prompt lengths move by +-25%; ``conditional`` (prefill remotely only long prompts)
under the same rule; otherwise ``colocated``. The reasons it does not pay are computed from the inputs and
printed with their numbers.

Goodput is a steady-state figure: each simulated run measures ``n_requests`` requests inside a window that
starts and ends :meth:`Search.warmup_s` away from the first and the last arrival (warm-up deletion), and
arrives enough requests around it to fill and drain the placement. Without the window, a run of a fixed
number of requests over a large slice never leaves its filling phase: of one pool ratio, a 12:8 slice scored
13.2 req/s per GPU and a 3:2 one 9.4, against 8.8 and 8.3 in steady state (bench/RESULTS.md), so slices of
different sizes were not comparable. ``run_s`` instead simulates load runs of that length whole, as a
measurement of that length sees them (bench/validate_advisor.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np

from phaselens.advisor.inputs import Cluster, InputError, Slo
from phaselens.advisor.screen import Candidate, Placement, Screen
from phaselens.advisor.simulator import SimResult, Simulator
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.workload import Workload

log = logging.getLogger(__name__)

MIN_MARGIN = 0.15
PERTURBATION = 0.25
#: Largest number of instances simulated at once; bigger placements are simulated as a proportional slice.
MAX_SLICE_INSTANCES = 8
_SIM_BISECT_TOL = 0.03
#: Requests of a simulated load run of fixed length (``run_s``): the bounds bench/validate_advisor.py uses.
RUN_MIN_REQUESTS = 40
RUN_MAX_REQUESTS = 1500


@dataclass
class Finalist:
    """A candidate after simulation."""

    candidate: Candidate
    #: the placement actually simulated (a proportional slice of a large one) and the scale back to full
    slice: Placement
    scale: float
    goodputs: list[float]
    result: SimResult | None = None

    @property
    def placement(self) -> Placement:
        return self.candidate.placement

    @property
    def goodput(self) -> float:
        return float(np.mean(self.goodputs)) if self.goodputs else 0.0

    @property
    def per_gpu(self) -> float:
        return self.goodput / max(self.placement.gpus, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.placement.to_dict(),
            "screen_goodput_rps": self.candidate.goodput,
            "screen_goodput_per_gpu": self.candidate.per_gpu,
            "screen_limit": self.candidate.limit,
            "sim_goodput_rps": self.goodput,
            "sim_goodput_per_gpu": self.per_gpu,
            "sim_goodput_by_seed": self.goodputs,
            "simulated_slice": self.slice.label,
            "slice_scale": self.scale,
            "sim_at_goodput": None if self.result is None else self.result.summary(),
        }


@dataclass
class Reason:
    """One computed reason, with the number that triggered it (or did not)."""

    code: str
    triggered: bool
    value: float
    threshold: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Advice:
    """The advisor's answer and everything behind it."""

    verdict: str
    rule: str
    margin: float
    gain: float
    colocated: Finalist | None
    split: Finalist | None
    conditional: Finalist | None
    reasons: list[Reason]
    robustness: dict[str, dict[str, float]]
    gpus_needed: dict[str, int | None]
    screen_candidates: list[Candidate]
    model: StepModel
    workload: Workload
    slo: Slo
    cluster: Cluster
    yearly_saving: float | None = None
    notes: list[str] = field(default_factory=list)
    #: why split / conditional were not recommended (each with its number)
    rejections: list[str] = field(default_factory=list)

    @property
    def recommended(self) -> Finalist | None:
        return {"split": self.split, "conditional": self.conditional}.get(self.verdict, self.colocated)


def _slice(pl: Placement) -> tuple[Placement, float]:
    """A small placement with (about) the same pool ratio, and the factor back to the full one."""
    if pl.kind == "colocated":
        k = min(pl.n_d, MAX_SLICE_INSTANCES // 2)
        return replace(pl, n_d=k), pl.n_d / k
    if pl.n_p + pl.n_d <= MAX_SLICE_INSTANCES:
        return pl, 1.0
    frac = Fraction(pl.n_p, pl.n_d).limit_denominator(MAX_SLICE_INSTANCES // 2)
    p, d = max(1, frac.numerator), max(1, frac.denominator)
    while p + d > MAX_SLICE_INSTANCES:
        p, d = max(1, p // 2), max(1, d // 2)
    # The full placement serves the smaller of its pools' scale-ups (conservative when rounded).
    return replace(pl, n_p=p, n_d=d), min(pl.n_p / p, pl.n_d / d)


class Search:
    """Runs the screen, simulates finalists, applies the decision rule."""

    def __init__(
        self,
        model: StepModel,
        workload: Workload,
        slo: Slo,
        cluster: Cluster,
        *,
        seeds: tuple[int, ...] = (0, 1),
        n_requests: int = 1000,
        finalists: int = 2,
        simulate: bool = True,
        run_s: float | None = None,
    ):
        self.model = model.with_tp_degrees(cluster.candidate_tp(), cluster.model, cluster.dtype_bytes
                                           ).with_peak_floor(cluster.model, cluster.gpu)
        self.workload = workload
        self.slo = slo
        self.cluster = cluster
        self.seeds = seeds
        self.n_requests = n_requests
        self.finalists = finalists
        self.simulate = simulate
        #: simulate runs of this many seconds of arrivals (a load run's length) instead of n_requests
        self.run_s = run_s

    @property
    def warmup_s(self) -> float:
        """Warm-up (and cool-down) cut from each steady-state run: a request at the SLO's edge that has a
        P90-long output stays this long (TTFT target + TPOT target x P90 output), so a placement holds its
        steady load once that long has passed since the first arrival (M/G/inf occupancy is
        ``rate x E[min(R, t)]``)."""
        out = float(np.quantile(self.workload.output_tokens, 0.9))
        return self.slo.ttft_s + self.slo.tpot_s * max(out - 1.0, 0.0)

    # ------------------------------------------------------------------ goodput by simulation

    def sim_goodput(self, cand: Candidate, seed: int) -> tuple[float, SimResult | None]:
        """Highest rate (full placement, req/s) whose simulated percentiles meet the SLO."""
        sl, scale = _slice(cand.placement)
        base = cand.goodput / scale if cand.goodput > 0 else 1.0

        steady_warmup = self.warmup_s

        def run(rate: float) -> SimResult:
            warmup: float | None = None
            if self.run_s is not None:
                # as a load run of run_s seconds sends (bench/validate_advisor.py): rate x seconds, clipped,
                # to the whole placement; the simulated slice gets its share
                full = min(RUN_MAX_REQUESTS, max(RUN_MIN_REQUESTS, round(rate * scale * self.run_s)))
                n = max(1, round(full / scale))
            else:
                # n_requests measured in the steady window, plus the arrivals of the warm-up and cool-down
                warmup = steady_warmup
                n = self.n_requests + math.ceil(2.0 * warmup * rate * 1.05) + 1
            return Simulator(self.model, self.workload, self.slo, self.cluster, sl, n_requests=n,
                             seed=seed, warmup_s=warmup).run(rate)

        lo, hi = 0.0, base * 1.5
        best: SimResult | None = None
        r = run(hi)
        grow = 0
        while r.meets_slo and grow < 4:
            lo, best, hi = hi, r, hi * 2
            r = run(hi)
            grow += 1
        if lo == 0.0:
            lo_try = base * 0.25
            r = run(lo_try)
            if r.meets_slo:
                lo, best = lo_try, r
            else:
                lo_try = base * 0.02
                r = run(lo_try)
                if not r.meets_slo:
                    return 0.0, r
                lo, best = lo_try, r
        while (hi - lo) > _SIM_BISECT_TOL * hi:
            mid = 0.5 * (lo + hi)
            r = run(mid)
            if r.meets_slo:
                lo, best = mid, r
            else:
                hi = mid
        return lo * scale, best

    def finalize(self, cand: Candidate) -> Finalist:
        sl, scale = _slice(cand.placement)
        goodputs, last = [], None
        for seed in self.seeds:
            g, res = self.sim_goodput(cand, seed)
            goodputs.append(g)
            last = last or res
        return Finalist(cand, sl, scale, goodputs, last)

    # ------------------------------------------------------------------ pipeline

    def screen(self, workload: Workload | None = None, cluster: Cluster | None = None) -> Screen:
        return Screen(self.model, workload or self.workload, self.slo, cluster or self.cluster)

    def run(self) -> Advice:
        sc = self.screen()
        colo = sc.colocated()
        split = sc.split()
        cond = sc.conditional()
        if not colo and not split:
            raise InputError(
                f"no placement of {self.cluster.model.name} fits {self.cluster.gpus} x "
                f"{self.cluster.gpu.name} (weights plus KV for one request)",
                "gpus",
            )
        self._check_feasible(sc, colo + split)

        def pick(cands: list[Candidate]) -> Finalist | None:
            cands = [c for c in cands if c.goodput > 0][: self.finalists]
            if not cands:
                return None
            if not self.simulate:
                first = cands[0]
                return Finalist(first, first.placement, 1.0, [first.goodput])
            done = [self.finalize(c) for c in cands]
            return max(done, key=lambda f: f.per_gpu)

        best_colo = pick(colo)
        best_split = pick(split)
        best_cond = pick(cond)
        return self.decide(sc, best_colo, best_split, best_cond, colo + split + cond)

    def _check_feasible(self, sc: Screen, cands: list[Candidate]) -> None:
        """SLOs that no configuration meets even at zero load are inconsistent with the workload."""
        if any(c.goodput > 0 for c in cands):
            return
        tp = max(sc.usable_tp())
        s = sc.prefill_service(tp)
        fastest = float(np.quantile(s, self.slo.ttft_pct / 100.0))
        co = self.model.coefficients(tp)
        step = co.decode_step(1, float(np.median(sc.prompt)))
        if fastest > self.slo.ttft_s:
            raise InputError(
                f"inconsistent SLOs for this workload: TTFT target {self.slo.ttft_s * 1e3:g} ms is below "
                f"the P{self.slo.ttft_pct:g} prefill time at TP{tp} with no queueing "
                f"({fastest * 1e3:.0f} ms)",
                "ttft_s",
            )
        if step > self.slo.tpot_s:
            raise InputError(
                f"inconsistent SLOs for this workload: TPOT target {self.slo.tpot_s * 1e3:g} ms is below "
                f"one decode step at TP{tp} ({step * 1e3:.1f} ms)",
                "tpot_s",
            )
        raise InputError(
            "no configuration meets the SLOs at any rate on this cluster "
            f"({self.slo.describe()}); relax the targets or add GPUs"
        )

    # ------------------------------------------------------------------ decision

    def _closed_form_gain(self, workload: Workload, kind: str, calibration: float = 1.0) -> float:
        """Gain of the best ``kind`` over colocated in closed form on ``workload``; ``calibration`` is the
        simulated/closed-form ratio of that gain's two terms at the nominal workload, so a closed form that is
        biased for one mode does not decide the robustness check."""
        sc = self.screen(workload)
        colo = sc.colocated()
        other = sc.split() if kind == "split" else sc.conditional()
        if not colo or not other or colo[0].per_gpu <= 0:
            return -1.0
        return calibration * other[0].per_gpu / colo[0].per_gpu - 1.0

    def decide(
        self,
        sc: Screen,
        colo: Finalist | None,
        split: Finalist | None,
        cond: Finalist | None,
        candidates: list[Candidate],
    ) -> Advice:
        err = self.model.error
        margin = max(MIN_MARGIN, 2.0 * err)
        colo_pg = colo.per_gpu if colo else 0.0

        def gain(f: Finalist | None) -> float:
            if f is None or f.per_gpu <= 0:
                return -1.0
            return math.inf if colo_pg <= 0 else f.per_gpu / colo_pg - 1.0

        rate = self.workload.rate
        robustness: dict[str, dict[str, float]] = {}
        needed: dict[str, int | None] = {}
        for name, fin in (("colocated", colo), ("split", split), ("conditional", cond)):
            needed[name] = None if fin is None else self._gpus_needed(sc, fin, rate)

        def robust(kind: str, fin: Finalist | None) -> bool:
            if fin is None:
                return False
            checks: dict[str, float] = {}
            calibration = 1.0
            both = colo is not None and colo.per_gpu > 0 and colo.candidate.per_gpu > 0
            if both and fin.candidate.per_gpu > 0:
                assert colo is not None
                calibration = (fin.per_gpu / fin.candidate.per_gpu) / (colo.per_gpu / colo.candidate.per_gpu)
            checks["closed-form calibration"] = calibration
            for f in (1 - PERTURBATION, 1 + PERTURBATION):
                checks[f"prompt x{f:g} gain"] = self._closed_form_gain(self.workload.scaled_prompts(f), kind,
                                                                       calibration)
            ok = all(v > margin for k, v in checks.items() if k.endswith("gain"))
            if not ok:
                failed = [f"{k} {v:+.1%}" for k, v in checks.items() if k.endswith("gain") and v <= margin]
                rejections.append(f"{kind} fails the prompt-length check: " + ", ".join(failed))
            for f in (1 - PERTURBATION, 1 + PERTURBATION):
                a = self._gpus_needed(sc, fin, rate * f)
                b = self._gpus_needed(sc, colo, rate * f) if colo else None
                checks[f"rate x{f:g} GPUs {kind}"] = float(a) if a is not None else math.inf
                checks[f"rate x{f:g} GPUs colocated"] = float(b) if b is not None else math.inf
                if a is None or (b is not None and a > b):
                    ok = False
                    rejections.append(f"{kind} needs {a} GPUs against colocated's {b} at rate x{f:g}")
            robustness[kind] = checks
            return ok

        rejections: list[str] = []
        split_gain, cond_gain = gain(split), gain(cond)
        split_ok = split_gain > margin and robust("split", split)
        cond_ok = cond_gain > margin and robust("conditional", cond)
        for kind, g in (("split", split_gain), ("conditional", cond_gain)):
            if -1.0 < g <= margin:
                rejections.append(f"{kind} gains {g:+.1%}, not more than the {margin:.1%} margin")
        if split_ok and (not cond_ok or split_gain >= cond_gain):
            verdict, best_gain = "split", split_gain
        elif cond_ok:
            verdict, best_gain = "conditional", cond_gain
        else:
            verdict, best_gain = "colocated", max(split_gain, cond_gain)
        rule = (
            "recommend split (or conditional) only if its simulated goodput per GPU beats the best "
            "colocated "
            f"one by more than max({MIN_MARGIN:.0%}, 2 x model error {err:.1%}) = {margin:.1%}, and it still "
            f"does with prompt lengths x{1 - PERTURBATION:g}/x{1 + PERTURBATION:g} (closed form) and needs "
            "no "
            f"more GPUs than colocated at rate x{1 - PERTURBATION:g}/x{1 + PERTURBATION:g}"
        )
        reasons = self.reasons(sc, colo, split, cond, split_gain, margin)
        saving = None
        chosen = {"split": split, "conditional": cond}.get(verdict)
        if chosen is not None and needed.get("colocated") and needed.get(verdict):
            gpus_saved = (needed["colocated"] or 0) - (needed[verdict] or 0)
            saving = gpus_saved * self.cluster.price_per_gpu_hour * 24 * 365
        notes = list(self.model.flags) + list(self.workload.notes)
        if needed.get("colocated") and needed["colocated"] > self.cluster.gpus:
            notes.append(
                f"at the workload's rate {rate:.3g} req/s colocated needs {needed['colocated']} GPUs, more "
                f"than the {self.cluster.gpus} given"
            )
        return Advice(
            verdict,
            rule,
            margin,
            best_gain,
            colo,
            split,
            cond,
            reasons,
            robustness,
            needed,
            candidates,
            self.model,
            self.workload,
            self.slo,
            self.cluster,
            saving,
            notes,
            rejections if verdict == "colocated" else [r for r in rejections if not r.startswith(verdict)],
        )

    def _gpus_needed(self, sc: Screen, fin: Finalist | None, rate: float) -> int | None:
        if fin is None:
            return None
        cand = fin.candidate
        # scale the closed-form instance goodputs by the simulated/closed-form ratio of this finalist
        factor = fin.goodput / cand.goodput if cand.goodput > 0 else 1.0
        if factor <= 0:
            return None
        pl = cand.placement
        if pl.kind == "colocated":
            g = factor * cand.goodput / max(pl.n_d, 1)
            return math.ceil(rate / g - 1e-9) * pl.tp_d
        gp = factor * cand.details.get("prefill_instance_goodput", 0.0)
        gd = factor * cand.details.get("decode_instance_goodput", 0.0)
        if gp <= 0 or gd <= 0:
            return None
        n_p = 0 if not math.isfinite(gp) else math.ceil(rate / gp - 1e-9)
        return n_p * pl.tp_p + math.ceil(rate / gd - 1e-9) * pl.tp_d

    def reasons(
        self,
        sc: Screen,
        colo: Finalist | None,
        split: Finalist | None,
        cond: Finalist | None,
        split_gain: float,
        margin: float,
    ) -> list[Reason]:
        """Why splitting does (not) pay, each with its number."""
        out: list[Reason] = []
        wl, cl, slo = self.workload, self.cluster, self.slo
        pays = split_gain > margin
        # 1. short effective prompts: how long one prompt's prefill stalls the decode steps it joins,
        #    against the TPOT budget (a split takes exactly that stall off the decodes)
        tp = colo.placement.tp_d if colo is not None else 1
        co = self.model.coefficients(tp)
        l_eff = wl.effective_prompt(False).astype(float)
        stall = float(np.mean(co.prefill.b * l_eff + co.prefill.c * l_eff * l_eff))
        ratio = stall / slo.tpot_s
        share = float(colo.candidate.details.get("prefill_work_share", 0.0)) if colo is not None else 0.0
        out.append(
            Reason(
                "short_prompts",
                ratio < 0.5 and not pays,
                ratio,
                0.5,
                f"a mean effective prompt ({l_eff.mean():.0f} tokens) adds {stall * 1e3:.1f} ms of prefill "
                "to the decode "
                f"step it joins at TP{tp}, {ratio:.0%} of the {slo.tpot_s * 1e3:g} ms TPOT target; prefill "
                f"is {share:.0%} "
                "of a colocated GPU's time at its goodput",
            )
        )
        # 2. prefix reuse on the decode side
        l_colo = float(wl.effective_prompt(False).mean())
        l_split = float(wl.effective_prompt(True).mean())
        extra = l_split / max(l_colo, 1.0) - 1.0
        out.append(
            Reason(
                "prefix_reuse_decode_side",
                extra > 0.3,
                extra,
                0.3,
                f"{wl.prefix_hit_rate:.0%} of prompt tokens hit the prefix cache, {wl.history_share:.0%} of "
                "those are "
                "earlier turns of the same session, held where they were decoded: a prefill pool "
                "recomputes them, "
                f"{l_split:.0f} vs {l_colo:.0f} prompt tokens per request ({extra:+.0%})",
            )
        )
        # 3. too few GPUs to split well (integer rounding)
        min_split = 2 * min(sc.usable_tp() or [1])
        if cl.gpus < min_split:
            out.append(
                Reason(
                    "too_few_gpus",
                    True,
                    float(cl.gpus),
                    float(min_split),
                    f"{cl.gpus} GPU(s): a split needs at least {min_split} (one prefill and one decode "
                    "instance)",
                )
            )
        elif split is not None:
            c = split.candidate
            loss = 1.0 - c.per_gpu / c.ideal_per_gpu if c.ideal_per_gpu > 0 else 0.0
            out.append(
                Reason(
                    "too_few_gpus",
                    loss > 0.1,
                    loss,
                    0.1,
                    f"with {cl.gpus} GPUs the best {c.placement.label} reaches {c.per_gpu:.3g} req/s per "
                    "GPU in "
                    f"closed form against {c.ideal_per_gpu:.3g} with ideal fractional pools: {loss:.0%} "
                    "lost to "
                    "integer rounding",
                )
            )
        # 4. slow KV link: what the split would serve with a free link, and the link's load at the colocated
        #    goodput per GPU (every request's KV crosses a link once)
        kv_mb = float(sc.kv_bytes.mean()) / 1e6
        per_xfer = float(sc.kv_bytes.mean()) / cl.link_bytes_per_s
        fast = self.screen(cluster=replace(cl, kv_link_gbps=1e6)).split()
        now = sc.split()
        if fast and fast[0].per_gpu > 0:
            lost = 1.0 - (now[0].per_gpu if now else 0.0) / fast[0].per_gpu
            per_gpu_rate = colo.per_gpu if colo is not None else fast[0].per_gpu
            load = per_gpu_rate * float(sc.kv_bytes.mean()) / cl.link_bytes_per_s
            out.append(
                Reason(
                    "slow_kv_link",
                    lost > 0.1,
                    lost,
                    0.1,
                    f"KV of a mean prompt is {kv_mb:.1f} MB: {per_xfer * 1e3:.1f} ms over a "
                    f"{cl.kv_link_gbps:g} Gb/s "
                    f"link per GPU; at {per_gpu_rate:.3g} req/s per GPU that is {load:.0%} link load; the "
                    "link costs "
                    f"the split {lost:.0%} of its goodput against a free one",
                )
            )
        # 5. SLO shape: which target binds colocated
        if colo is not None and colo.result is not None:
            res = colo.result
            ttft_r = res.ttft_q / slo.ttft_s
            tpot_r = res.tpot_q / slo.tpot_s
            ttft_bound = ttft_r > tpot_r
            out.append(
                Reason(
                    "slo_shape",
                    ttft_bound and not pays,
                    tpot_r,
                    1.0,
                    f"at its goodput colocated runs at P{slo.ttft_pct:g} TTFT {res.ttft_q * 1e3:.0f} ms "
                    f"({ttft_r:.0%} of target) and P{slo.tpot_pct:g} TPOT {res.tpot_q * 1e3:.1f} ms "
                    f"({tpot_r:.0%}): "
                    + (
                        "TTFT binds, and a split's gain is on TPOT (no prefill stalls in decode steps)"
                        if ttft_bound
                        else "TPOT binds: prefill stalls in decode steps are what a split removes"
                    ),
                )
            )
        return out
