"""The prediction side of "advisor against reality" (issues 8, 11): predicted goodput of colocated and split.

:func:`predict_goodput` takes what a validation run knows before it measures anything: the step profile (a
trace), the workload's length distributions (fixed, or lognormal as the load generator draws them) or a
sample request log, the SLOs, the GPUs and the KV link. It runs the same fit and search as
``phaselens advise`` and returns the simulated goodput (req/s over all the placement's GPUs) of the best
colocated placement and the best split, with the verdict the advisor's rule gives.

The request rate is what the verdict is judged at (the rule compares the GPUs each mode needs at that rate
and at +-25%); the goodputs themselves do not depend on it. With ``rate=None`` the verdict is judged at the
colocated goodput, i.e. the load the G GPUs just carry colocated, which is where the question "would a split
do better" is asked. :attr:`Prediction.command` is the ``phaselens advise`` command line that reports the
same figures (its ``--json`` has them under ``predicted_goodput_rps`` and ``verdict``).

With ``every_placement=True`` (issue 11: four GPUs, four configurations measured) it also simulates every
placement of the GPUs at TP ``tp``, not only the two finalists the advisor reports: colocated (all GPUs as
replicas) and each split ``p:d`` (``p`` prefill and ``d`` decode instances), each the way the search
simulates a finalist (:meth:`Search.finalize` on the closed-form candidate of exactly that placement), in
:attr:`Prediction.placements` under :func:`placement_names`. :func:`rank` and :func:`top_two_match` are
issue 11's acceptance rule: the advisor's top two configurations, in order, are the measured top two.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.screen import Candidate, Placement
from phaselens.advisor.search import Advice, Finalist, Search
from phaselens.advisor.step_model import StepModel
from phaselens.advisor.workload import Workload

log = logging.getLogger(__name__)

#: A length distribution: a fixed length, or (median, sigma, lo, hi) of a clipped lognormal as the load
#: generator's ``LengthDist`` (engine/loadgen.py), which may be passed itself.
Lengths = Union[int, tuple[float, float, int, int], Any]
#: Placeholder rate of the first pass when the rate is not given (the goodputs do not depend on it).
_NOMINAL_RATE = 1.0


@dataclass(frozen=True)
class Prediction:
    """Predicted goodput per mode and the verdict, with the advice behind them."""

    colocated_rps: float | None
    split_rps: float | None
    verdict: str
    colocated_label: str | None
    split_label: str | None
    #: the request rate the verdict was judged at
    rate_rps: float
    #: the ``phaselens advise`` command line giving the same figures
    command: list[str]
    advice: Advice
    #: simulated goodput (req/s, all GPUs) of every placement at TP ``tp`` by :func:`placement_names`
    #: ("colocated", "1:3", "2:2", ...); empty unless ``every_placement`` was asked for
    placements: dict[str, float] = field(default_factory=dict)
    #: the advisor's label of each of those placements ("split P 1xTP1 : D 3xTP1", ...)
    placement_labels: dict[str, str] = field(default_factory=dict)
    #: each placement's goodput per simulation seed (the mean is :attr:`placements`): how far one run of it
    #: may land from the mean
    placement_by_seed: dict[str, list[float]] = field(default_factory=dict)

    @property
    def split_gain(self) -> float | None:
        """Split's goodput over colocated's, minus 1 (both on the same GPUs)."""
        if not self.colocated_rps or self.split_rps is None:
            return None
        return self.split_rps / self.colocated_rps - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "colocated_rps": self.colocated_rps,
            "split_rps": self.split_rps,
            "colocated_label": self.colocated_label,
            "split_label": self.split_label,
            "split_gain": self.split_gain,
            "verdict": self.verdict,
            "rate_rps": self.rate_rps,
            "margin": self.advice.margin,
            "rejections": list(self.advice.rejections),
            "step_model_error": dict(self.advice.model.holdout_error),
            "command": " ".join(self.command),
            "placements": dict(self.placements),
            "placement_labels": dict(self.placement_labels),
            "placement_by_seed": {k: list(v) for k, v in self.placement_by_seed.items()},
            "ranking": rank(self.placements),
        }


def placement_name(pl: Placement) -> str:
    """The stable name of a colocated or split placement: ``colocated``, or ``P:D`` instance counts."""
    if pl.kind == "colocated":
        return "colocated"
    if pl.kind == "split":
        return f"{pl.n_p}:{pl.n_d}"
    raise ValueError(f"no configuration name for a {pl.kind} placement ({pl.label})")


def placement_names(gpus: int, tp: int = 1) -> list[str]:
    """Every colocated or split configuration of ``gpus`` GPUs in TP-``tp`` instances, colocated first, then
    splits by prefill instances: ``["colocated", "1:3", "2:2", "3:1"]`` for 4 GPUs at TP1."""
    if tp < 1 or gpus < tp:
        raise ValueError(f"{gpus} GPU(s) hold no TP{tp} instance")
    n = gpus // tp
    return ["colocated"] + [f"{p}:{n - p}" for p in range(1, n)]


def rank(goodputs: Mapping[str, float | None]) -> list[str]:
    """Configuration names, highest goodput first (a missing figure counts as 0; ties keep the given
    order)."""
    return sorted(goodputs, key=lambda k: -(goodputs[k] or 0.0))


def top_two_match(predicted: Mapping[str, float | None], measured: Mapping[str, float | None]) -> bool:
    """Issue 11's ranking rule: over the configurations both name, the predicted best two are the measured
    best two, in the same order."""
    common = [k for k in measured if k in predicted]
    if len(common) < 2:
        raise ValueError(f"the rule compares at least two configurations, got {common}")
    return rank({k: predicted[k] for k in common})[:2] == rank({k: measured[k] for k in common})[:2]


def length_spec(dist: Lengths) -> str:
    """The advisor's workload-spec text of a length distribution (``fixed:N`` or ``lognormal_median:...``)."""
    if isinstance(dist, bool):
        raise ValueError(f"a length distribution, not {dist!r}")
    if isinstance(dist, (int, float)):
        if dist < 1 or int(dist) != dist:
            raise ValueError(f"a fixed length must be a whole number of tokens >= 1, got {dist!r}")
        return f"fixed:{int(dist)}"
    fields = ("median", "sigma", "lo", "hi")
    if all(hasattr(dist, f) for f in fields):
        median, sigma, lo, hi = (getattr(dist, f) for f in fields)
    else:
        median, sigma, lo, hi = tuple(dist)
    return f"lognormal_median:{float(median)!r}:{float(sigma)!r}:{int(lo)}:{int(hi)}"


def _fmt_rate(rate: float) -> str:
    return repr(float(rate))


def predict_goodput(
    profile: str | Path | Sequence[str | Path],
    *,
    ttft_ms: float,
    tpot_ms: float,
    prompt: Lengths | None = None,
    output: Lengths | None = None,
    request_log: str | Path | None = None,
    attainment: float | None = 0.9,
    ttft_pct: float = 90.0,
    tpot_pct: float = 90.0,
    gpus: int = 2,
    kv_link_gbps: float = 400.0,
    preset: str = "llama-3.1-8b",
    tp: int = 1,
    chunk_budget: int | None = None,
    max_num_seqs: int | None = None,
    rate: float | None = None,
    burstiness: float = 1.0,
    ttft_overhead_ms: float | None = None,
    serving_overhead_ms: float | None = None,
    gpu_name: str | None = None,
    seeds: int = 2,
    n_requests: int = 1000,
    run_s: float | None = None,
    every_placement: bool = False,
) -> Prediction:
    """Predicted goodput (req/s, all GPUs) of the best colocated placement and the best split on ``gpus``
    GPUs at TP ``tp``, and the advisor's verdict.

    The workload is ``prompt`` and ``output`` (each a fixed length or a load-generator lognormal, Poisson
    arrivals unless ``burstiness`` says otherwise), or a ``request_log`` from ``phaselens serve
    --request-log`` (lengths, burstiness and measured TTFTs from the log). Given with lengths, the log serves
    only to estimate the TTFT overhead. ``chunk_budget`` and ``max_num_seqs`` are the
    serving engine's ``--max-num-batched-tokens`` and ``--max-num-seqs`` (so colocated is judged at the
    engine's own chunk budget; split prefill workers chunk at it too). ``kv_link_gbps`` is the per-GPU
    bandwidth between the pools in Gb/s (a measured peer copy of B bytes/s is ``B * 8 / 1e9``).
    ``ttft_overhead_ms``: time outside the engine's steps in every TTFT; None estimates it from the request
    log as ``phaselens advise`` does (0 without a log).
    ``serving_overhead_ms``: host time per step the serving path adds to the profile's step cadence; None
    estimates it from the request log's TPOTs as ``phaselens advise`` does (none without a log).
    ``run_s``: simulate load runs of that many seconds of arrivals, as the measurement's goodput search ran
    them (short runs let a queue build less: a TTFT-limited mode passes higher rates), instead of
    ``n_requests``-request runs (steady state).
    ``every_placement``: also simulate every colocated and split placement of the GPUs at TP ``tp``
    (:attr:`Prediction.placements`); the two finalists are not simulated twice.
    Raises :class:`~phaselens.advisor.inputs.InputError` or ``ValueError`` naming a bad input.
    """
    from phaselens.advisor.commands import calibrate_serving, estimate_ttft_overhead
    from phaselens.engine.config import preset as get_preset
    from phaselens.gpus import gpu_spec
    from phaselens.trace import read_trace

    paths = [str(profile)] if isinstance(profile, (str, Path)) else [str(p) for p in profile]
    if (prompt is None) != (output is None):
        raise ValueError("give both prompt and output lengths (or neither, with a request_log)")
    if prompt is None and request_log is None:
        raise ValueError("give the workload: prompt and output lengths, or a request_log")
    if rate is not None and not rate > 0:
        raise ValueError(f"request rate must be > 0 req/s, got {rate!r}")
    model_cfg = get_preset(preset)
    steps = []
    for path in paths:
        tr = read_trace(path)
        steps.extend(tr.steps)
        if gpu_name is None and tr.meta is not None and tr.meta.gpus:
            gpu_name = tr.meta.gpus[0].name
    if gpu_name is None:
        raise ValueError(f"the profile {', '.join(paths)} names no GPU (no meta record): give gpu_name")
    step_model = StepModel.fit(steps, model=model_cfg, tp=1, source=", ".join(paths))
    if "host" in {s.clock.value for s in steps}:
        step_model = replace(step_model, flags=step_model.flags + (
            "steps timed on the host clock (CPU engine): GPU timings will differ",))

    cmd = ["phaselens", "advise", *[a for p in paths for a in ("--trace", p)], "--preset", preset,
           "--gpus", str(gpus), "--tp", str(tp), "--kv-link-gbps", repr(float(kv_link_gbps)),
           "--ttft-ms", repr(float(ttft_ms)), "--tpot-ms", repr(float(tpot_ms)),
           "--ttft-pct", repr(float(ttft_pct)), "--tpot-pct", repr(float(tpot_pct)),
           "--seeds", str(seeds), "--requests", str(n_requests), "--json", "--html", ""]
    if attainment is not None:
        cmd += ["--attainment", repr(float(attainment))]
    if chunk_budget is not None:
        cmd += ["--chunk-budget", str(chunk_budget)]
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    if run_s is not None:
        cmd += ["--run-seconds", repr(float(run_s))]

    def spec_text(r: float) -> str:
        assert prompt is not None and output is not None
        return (f"rate={_fmt_rate(r)},prompt={length_spec(prompt)},output={length_spec(output)},"
                f"burstiness={float(burstiness)!r}")

    logged = None if request_log is None else Workload.from_request_log(request_log, rate=rate)
    if serving_overhead_ms is not None or logged is not None:
        step_model = calibrate_serving(step_model, logged, 1, chunk_budget,
                                       None if serving_overhead_ms is None else serving_overhead_ms / 1e3)
    if ttft_overhead_ms is not None:
        overhead_s = ttft_overhead_ms / 1e3
    else:
        overhead_s = 0.0 if logged is None else estimate_ttft_overhead(step_model, logged, 1)
    from_log = prompt is None
    if from_log:
        assert logged is not None
        workload = logged
    else:
        workload = Workload.from_spec(spec_text(rate or _NOMINAL_RATE))
    slo = Slo(ttft_ms / 1e3, tpot_ms / 1e3, ttft_pct, tpot_pct, attainment)
    cluster = Cluster(gpus=gpus, gpu=gpu_spec(gpu_name), model=model_cfg, gpus_per_node=max(8, gpus),
                      kv_link_gbps=kv_link_gbps, tp_degrees=(tp,), ttft_overhead_s=overhead_s,
                      chunk_budget=chunk_budget, max_num_seqs=max_num_seqs)
    if ttft_overhead_ms is not None or not from_log:
        cmd += ["--ttft-overhead-ms", repr(overhead_s * 1e3)]
    if step_model.host.serving_source and (serving_overhead_ms is not None or not from_log):
        cmd += ["--serving-overhead-ms", repr(step_model.host.serving_s * 1e3)]
    if cluster.gpus_per_node != 8:
        cmd += ["--gpus-per-node", str(cluster.gpus_per_node)]

    def search(wl: Workload) -> Search:
        return Search(step_model, wl, slo, cluster, seeds=tuple(range(seeds)), n_requests=n_requests,
                      run_s=run_s)

    first = search(workload)
    advice = first.run()
    # simulated before the verdict's second pass: its goodputs are the first pass's finalists' too
    every = _every_placement(first, advice, tp) if every_placement else {}
    if rate is None:
        # judge the verdict at the load the GPUs just carry colocated (the goodputs do not depend on it)
        at = next((f.goodput for f in (advice.colocated, advice.split) if f is not None and f.goodput > 0),
                  None)
        if at is not None and math.isfinite(at):
            workload = workload.with_rate(at)
            again = search(workload)
            advice = again.decide(again.screen(), advice.colocated, advice.split, advice.conditional,
                                  advice.screen_candidates)
    if from_log:
        cmd += ["--request-log", str(request_log), "--rate", _fmt_rate(workload.rate)]
    else:
        cmd += ["--workload", spec_text(workload.rate)]
    colo, split = advice.colocated, advice.split
    return Prediction(
        colocated_rps=None if colo is None else colo.goodput,
        split_rps=None if split is None else split.goodput,
        verdict=advice.verdict,
        colocated_label=None if colo is None else colo.placement.label,
        split_label=None if split is None else split.placement.label,
        rate_rps=workload.rate,
        command=cmd,
        advice=advice,
        placements={name: f.goodput for name, f in every.items()},
        placement_labels={name: f.placement.label for name, f in every.items()},
        placement_by_seed={name: list(f.goodputs) for name, f in every.items()},
    )


def _every_placement(search: Search, advice: Advice, tp: int) -> dict[str, Finalist]:
    """Every colocated and split placement of the cluster's GPUs at TP ``tp``, simulated as finalists are.

    Colocated is the screen's best colocated candidate of all GPUs at that TP (with the engine's chunk
    budget fixed, the only one); a placement the search already simulated as a finalist is taken from it.
    """
    sc = search.screen()
    n = search.cluster.gpus // tp
    if tp not in sc.usable_tp():
        raise ValueError(f"TP{tp} is not a usable degree here (the model does not fit, or no step model)")
    done = [f for f in (advice.colocated, advice.split) if f is not None]

    def simulated(cand: Candidate) -> Finalist:
        same = next((f for f in done if f.placement == cand.placement), None)
        return same if same is not None else search.finalize(cand)

    out: dict[str, Finalist] = {}
    colo = [c for c in sc.colocated() if c.placement.tp_d == tp and c.placement.n_d == n]
    if advice.colocated is not None and advice.colocated.placement in [c.placement for c in colo]:
        out["colocated"] = advice.colocated  # the finalist: the best simulated chunk budget
    elif colo:
        out["colocated"] = simulated(colo[0])
    for n_p in range(1, n):
        fin = simulated(sc.split_candidate(tp, n_p, tp, n - n_p))
        out[placement_name(fin.placement)] = fin
    log.info("every placement of %d GPUs at TP%d: %s", search.cluster.gpus, tp,
             ", ".join(f"{k} {f.goodput:.3g} req/s" for k, f in out.items()))
    return out


__all__ = ["Prediction", "predict_goodput", "length_spec", "placement_name", "placement_names", "rank",
           "top_two_match"]
