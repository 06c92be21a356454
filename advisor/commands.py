"""``phaselens advise``: should I split prefill and decode? Strict about its inputs; every bad value is
named, with the option it came from."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from phaselens.advisor.inputs import InputError
from phaselens.advisor.step_model import StepModel
from phaselens.cli import FiniteRange
from phaselens.advisor.workload import Workload

log = logging.getLogger(__name__)

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

#: the option behind each Slo / Cluster field, so that an InputError names what the operator typed
_OPTION_OF_FIELD = {
    "ttft_s": "--ttft-ms",
    "tpot_s": "--tpot-ms",
    "ttft_pct": "--ttft-pct",
    "tpot_pct": "--tpot-pct",
    "attainment": "--attainment",
    "gpus": "--gpus",
    "gpus_per_node": "--gpus-per-node",
    "kv_link_gbps": "--kv-link-gbps",
    "price_per_gpu_hour": "--price",
    "ttft_overhead_s": "--ttft-overhead-ms",
    "chunk_budget": "--chunk-budget",
    "max_num_seqs": "--max-num-seqs",
    "tp_degrees": "--tp",
}


def _usage_error(exc: InputError) -> click.UsageError:
    """A usage error for an advisor input error, naming the option behind it when there is one."""
    option = _OPTION_OF_FIELD.get(exc.field or "")
    return click.BadParameter(str(exc), param_hint=option) if option else click.UsageError(str(exc))


def _duration_s(text: str) -> float:
    try:
        return (
            float(text[:-1]) * _DURATION_UNITS[text[-1]]
            if text and text[-1] in _DURATION_UNITS
            else float(text)
        )
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a duration like 30m, 2h or 3600", param_hint="--prometheus-range"
        )


@click.command("advise")
@click.option(
    "--trace",
    "trace_paths",
    type=click.Path(dir_okay=False),
    multiple=True,
    help="Step records to fit the step-time model: a JSONL trace or the engine's --shim-jsonl files "
    "(repeat for several workers).",
)
@click.option(
    "--request-log",
    type=click.Path(dir_okay=False),
    default=None,
    help="The engine's request log (phaselens serve --request-log): the workload.",
)
@click.option(
    "--workload",
    "workload_spec",
    default=None,
    help="A workload spec instead: rate=4,prompt=lognormal:800:0.8,output=fixed:200[,burstiness=1,"
    "prefix_hit=0.2,multi_turn=0.3].",
)
@click.option("--prometheus", "prom_url", default=None, help="Prometheus base URL to read the workload from.")
@click.option("--prometheus-range", default="1h", show_default=True, help="How far back from now to query.")
@click.option(
    "--rate", type=float, default=None, help="Target request rate (req/s); default: the workload's own."
)
@click.option(
    "--preset", default=None, help="Model shape preset (tiny, llama-3.2-1b, llama-3.1-8b, llama-3.1-70b)."
)
@click.option(
    "--model-config",
    type=click.Path(dir_okay=False),
    default=None,
    help="A Hugging Face config.json for the model shape instead of --preset.",
)
@click.option(
    "--gpu",
    "gpu_name",
    default=None,
    help="GPU model (NVML name, e.g. 'NVIDIA H100 80GB HBM3'); default: the trace's meta record.",
)
@click.option("--gpus", type=int, required=True, help="GPUs available for the deployment.")
@click.option("--gpus-per-node", type=int, default=8, show_default=True)
@click.option(
    "--tp",
    "tp_degrees",
    type=int,
    multiple=True,
    help="TP degrees to consider (repeat); default powers of 2.",
)
@click.option("--measured-tp", type=int, default=1, show_default=True, help="TP degree of the traced engine.")
@click.option(
    "--kv-link-gbps",
    type=float,
    default=400.0,
    show_default=True,
    help="Network bandwidth per GPU between the pools (Gb/s).",
)
@click.option(
    "--price", "price_per_gpu_hour", type=float, default=2.0, show_default=True, help="$ per GPU-hour."
)
@click.option(
    "--chunk-budget",
    type=click.IntRange(min=0),
    default=None,
    help="The colocated engine's token budget per step (its --max-num-batched-tokens), when fixed: only "
    "that budget is considered (0: whole prompts); default: every budget the screen knows.",
)
@click.option(
    "--max-num-seqs",
    type=click.IntRange(min=1),
    default=None,
    help="Most sequences one engine instance runs at once (its --max-num-seqs); default: no limit.",
)
@click.option("--ttft-ms", type=float, required=True, help="TTFT target (ms).")
@click.option("--tpot-ms", type=float, required=True, help="TPOT target (ms).")
@click.option(
    "--ttft-pct", type=float, default=90.0, show_default=True, help="TTFT percentile the target applies to."
)
@click.option(
    "--tpot-pct", type=float, default=90.0, show_default=True, help="TPOT percentile the target applies to."
)
@click.option(
    "--attainment", type=float, default=None, help="Joint SLO attainment required (0..1), optional."
)
@click.option(
    "--ttft-overhead-ms",
    type=float,
    default=None,
    help="Latency outside the engine's steps added to every TTFT (front-end, tokenization); default: "
    "estimated from the request log and the step model, else 0.",
)
@click.option(
    "--serving-overhead-ms",
    type=FiniteRange(min=0.0),
    default=None,
    help="Host time per step the serving path adds to the profile's cadence (output streaming to the "
    "front-end), besides which each sequence pays the engine's per-sequence host time once more; default: "
    "estimated from the request log's TPOTs, else none.",
)
@click.option("--seeds", type=click.IntRange(1, 16), default=2, show_default=True, help="Simulation seeds.")
@click.option(
    "--requests",
    "n_requests",
    type=click.IntRange(100, 100000),
    default=1000,
    show_default=True,
    help="Requests measured per simulation run, in its steady window (the run adds the arrivals of its "
    "warm-up and cool-down: TTFT target + TPOT target x P90 output each).",
)
@click.option(
    "--run-seconds",
    "run_s",
    type=FiniteRange(min=1.0),
    default=None,
    help="Simulate load runs of this many seconds of arrivals (rate x seconds requests, 40..1500), as a "
    "benchmark's goodput search runs them, instead of --requests (steady state).",
)
@click.option("--no-simulate", is_flag=True, help="Closed-form screen only (fast; less exact).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    default="report.html",
    show_default=True,
    help="Where to write the HTML report ('' for none).",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the phaselens_advisor_* metrics here in the Prometheus text format.",
)
@click.option("--apply", is_flag=True,
              help="Switch the running engine (--engine) to the recommended mode through its admin API.")
@click.option("--engine", "engine_url", default=None, help="The engine's base URL, for --apply.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the engine's admin token, for --apply (default: $PHASELENS_ADMIN_TOKEN).")
def advise(
    trace_paths: tuple[str, ...],
    request_log: str | None,
    workload_spec: str | None,
    prom_url: str | None,
    prometheus_range: str,
    rate: float | None,
    preset: str | None,
    model_config: str | None,
    gpu_name: str | None,
    gpus: int,
    gpus_per_node: int,
    tp_degrees: tuple[int, ...],
    measured_tp: int,
    kv_link_gbps: float,
    price_per_gpu_hour: float,
    chunk_budget: int | None,
    max_num_seqs: int | None,
    ttft_ms: float,
    tpot_ms: float,
    ttft_pct: float,
    tpot_pct: float,
    attainment: float | None,
    ttft_overhead_ms: float | None,
    serving_overhead_ms: float | None,
    seeds: int,
    n_requests: int,
    run_s: float | None,
    no_simulate: bool,
    as_json: bool,
    html_path: str,
    metrics_file: str | None,
    apply: bool,
    engine_url: str | None,
    token_file: str | None,
) -> None:
    """Should prefill and decode run on separate GPU pools? Fits the step model to your steps, screens every
    split and colocated configuration, simulates the best, and says whether splitting pays, with numbers."""
    from phaselens.advisor import report
    from phaselens.advisor.inputs import Cluster, Slo
    from phaselens.advisor.search import Search
    from phaselens.advisor.step_model import NotEnoughStepsError
    from phaselens.advisor.workload import WorkloadError
    from phaselens.engine.config import ModelConfig, preset as get_preset
    from phaselens.gpus import UnknownGpuError, gpu_spec
    from phaselens.trace import read_trace

    token = None
    if apply:
        from phaselens.engine.mode_cli import read_token

        if not engine_url:
            raise click.UsageError("--apply needs --engine URL (the engine to switch)")
        token = read_token(token_file)  # strict at start-up: no token, no search
    if gpus < 1:
        raise click.BadParameter(f"{gpus} (need at least 1 GPU)", param_hint="--gpus")
    if gpus_per_node < 1:
        raise click.BadParameter(f"{gpus_per_node} (need at least 1)", param_hint="--gpus-per-node")
    if rate is not None and not rate > 0:
        raise click.BadParameter(f"{rate} (requests per second must be > 0)", param_hint="--rate")
    if measured_tp < 1:
        raise click.BadParameter(f"{measured_tp} (must be >= 1)", param_hint="--measured-tp")
    sources = [s for s in (request_log, workload_spec, prom_url) if s]
    if len(sources) != 1:
        raise click.UsageError("give exactly one workload source: --request-log, --workload or --prometheus")

    # model shape
    if (preset is None) == (model_config is None):
        raise click.UsageError("give the model shape with exactly one of --preset or --model-config")
    try:
        if preset:
            model = get_preset(preset)
        else:
            assert model_config is not None
            model = ModelConfig.from_hf_config(model_config)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--preset" if preset else "--model-config") from None

    # steps
    trace = None
    for trace_path in trace_paths:
        if not Path(trace_path).is_file():
            raise click.BadParameter(f"{trace_path!r} does not exist", param_hint="--trace")
        part = read_trace(trace_path)
        if part.malformed:
            log.warning("%s: %d malformed lines skipped", trace_path, part.malformed)
        if trace is None:
            trace = part
        else:
            trace.meta = trace.meta or part.meta
            trace.steps.extend(part.steps)
            trace.samples.extend(part.samples)
    trace_path = ", ".join(trace_paths)
    if gpu_name is None and trace is not None and trace.meta is not None and trace.meta.gpus:
        gpu_name = trace.meta.gpus[0].name
    if gpu_name is None:
        raise click.UsageError("give the GPU model with --gpu (the trace has no meta record naming it)")
    try:
        gpu = gpu_spec(gpu_name)
    except UnknownGpuError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpu") from None

    try:
        slo = Slo(ttft_ms / 1e3, tpot_ms / 1e3, ttft_pct, tpot_pct, attainment)
        cluster = Cluster(
            gpus=gpus,
            gpu=gpu,
            model=model,
            gpus_per_node=gpus_per_node,
            kv_link_gbps=kv_link_gbps,
            price_per_gpu_hour=price_per_gpu_hour,
            tp_degrees=tuple(tp_degrees),
            chunk_budget=chunk_budget,
            max_num_seqs=max_num_seqs,
        )
    except InputError as exc:
        raise _usage_error(exc) from None

    try:
        if trace is not None:
            step_model = StepModel.fit(trace.steps, model=model, tp=measured_tp, source=str(trace_path))
            clocks = {s.clock.value for s in trace.steps}
            if "host" in clocks:
                step_model = _flag(
                    step_model, "steps timed on the host clock (CPU engine): GPU timings will differ"
                )
        else:
            step_model = StepModel.roofline(model, gpu, cluster.candidate_tp())
    except NotEnoughStepsError as exc:
        raise click.BadParameter(str(exc), param_hint="--trace") from None

    try:
        if request_log:
            workload = Workload.from_request_log(request_log, rate=rate)
        elif workload_spec:
            workload = Workload.from_spec(workload_spec)
        else:
            end = time.time()
            assert prom_url is not None
            workload = Workload.from_prometheus(prom_url, end - _duration_s(prometheus_range), end)
        if rate is not None:
            workload = workload.with_rate(rate)
    except WorkloadError as exc:
        hint = "--request-log" if request_log else "--workload" if workload_spec else "--prometheus"
        raise click.BadParameter(str(exc), param_hint=hint) from None

    step_model = calibrate_serving(step_model, workload, measured_tp, chunk_budget,
                                   None if serving_overhead_ms is None else serving_overhead_ms / 1e3)
    if ttft_overhead_ms is None:
        overhead = estimate_ttft_overhead(step_model, workload, measured_tp)
        if overhead > 0:
            workload = replace(
                workload,
                notes=workload.notes
                + (
                    f"TTFT overhead outside the steps estimated at {overhead * 1e3:.1f} ms (25th percentile "
                    "of measured "
                    "TTFT minus the step model's prefill step, host gap included, from the request log)",
                ),
            )
    else:
        overhead = ttft_overhead_ms / 1e3
    try:
        cluster = replace(cluster, ttft_overhead_s=overhead)
    except InputError as exc:
        raise _usage_error(exc) from None
    try:
        advice = Search(
            step_model,
            workload,
            slo,
            cluster,
            seeds=tuple(range(seeds)),
            n_requests=n_requests,
            simulate=not no_simulate,
            run_s=run_s,
        ).run()
    except InputError as exc:
        raise _usage_error(exc) from None

    if as_json:
        click.echo(report.to_json(advice))
    else:
        report.render_terminal(advice)
    if html_path:
        steps, samples = (trace.steps, trace.samples) if trace else ([], [])
        out = report.write_html(advice, html_path, steps, samples)
        click.echo(f"wrote {out}", err=as_json)
    if metrics_file:
        Path(metrics_file).write_text(report.metrics_text(advice), encoding="utf-8")
    sys.stdout.flush()
    if apply:
        assert engine_url is not None and token is not None
        _apply(advice, engine_url, token)


def _apply(advice: Any, engine_url: str, token: str) -> None:
    """Perform the verdict on the engine, verify it, and say what was done; exit 1 if it could not be."""
    from phaselens.advisor.apply import apply_recommendation

    finalist = advice.recommended
    placement = finalist.placement if finalist is not None else None
    if advice.verdict == "conditional":
        raise click.ClickException("the verdict is conditional (prefill remotely only long prompts): the "
                                   "bundled engine has no conditional mode; nothing was changed")
    if advice.verdict == "split":
        assert placement is not None
        if placement.tp_p != 1 or placement.tp_d != 1:
            raise click.ClickException(
                f"the recommended {placement.label} needs tensor parallelism; the bundled engine runs one "
                "GPU per worker (TP1): nothing was changed")
        result = apply_recommendation(engine_url, token, "split", placement.n_p, placement.n_d)
    else:
        result = apply_recommendation(engine_url, token, "colocated")
    for check in result.checks:
        click.echo(f"  check: {check}", err=True)
    if not result.ok:
        raise click.ClickException(f"apply failed: {result.message}")
    click.echo(f"applied: {result.message}", err=True)


def _flag(model: StepModel, text: str) -> StepModel:
    return replace(model, flags=model.flags + (text,))


def calibrate_serving(model: StepModel, workload: Workload | None, tp: int, chunk_budget: int | None,
                      given_s: float | None = None) -> StepModel:
    """``model`` with the serving path's per-step overhead: ``given_s`` when given, else estimated from the
    request log behind ``workload`` (:func:`~phaselens.advisor.host_gap.estimate_serving_overhead`); unchanged
    when neither is there. The figure and where it came from go into the model's flags."""
    from phaselens.advisor.host_gap import estimate_serving_overhead

    if given_s is not None:
        return model.with_serving_overhead(
            given_s, f"serving overhead per step {given_s * 1e3:.2f} ms (given), with the per-sequence part, "
                     "added to every simulated step")
    if workload is None or tp not in model.by_tp:
        return model
    est = estimate_serving_overhead(model.coefficients(tp), workload, chunk_budget)
    if est is None:
        if workload.logged_times is not None:
            return _flag(model, "serving overhead not estimated: too few logged requests with two or more "
                                "decode steps")
        return model
    return model.with_serving_overhead(est.per_step_s, est.note())


def estimate_ttft_overhead(model: StepModel, workload: Workload, tp: int) -> float:
    """Latency every request pays outside the engine's steps: the 25th percentile of measured TTFT minus the
    modelled prefill step, host gap included (the low quantile keeps queueing out), 0 without measurements."""
    ttft = workload.measured_ttft_s
    if ttft is None or not np.isfinite(ttft).any() or tp not in model.by_tp:
        return 0.0
    co = model.coefficients(tp)
    n = workload.effective_prompt(False).astype(float)
    c = workload.cached_tokens.astype(float)
    pre = co.prefill_step(n, n * n + 2 * n * c)
    diff = (ttft - pre)[np.isfinite(ttft)]
    return float(min(max(np.quantile(diff, 0.25), 0.0), 10.0))
