"""``phaselens load``: drive an OpenAI-compatible server with a seeded workload and report its latencies."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import click

from phaselens.cli import FiniteRange
from phaselens.engine.loadgen import SHAREGPT_OUTPUT, SHAREGPT_PROMPT, RequestResult

_P, _O = SHAREGPT_PROMPT, SHAREGPT_OUTPUT
_POS = FiniteRange(min=0, min_open=True)


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (requests per second, or inf)",
                                 param_hint="--rate") from None
    if not rate > 0:
        raise click.BadParameter(f"{value!r}: the rate must be > 0 (or inf)", param_hint="--rate")
    return rate


def _check_url(url: str) -> str:
    """The base URL without a trailing slash; BadParameter unless it is ``http(s)://host[:port]``."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise click.BadParameter(f"{url!r}: expected http://host:port", param_hint="--url")
    return url.rstrip("/")


def _check_writable(path: str) -> None:
    """BadParameter unless ``path`` can be written, checked before the run (a run's results must not be lost
    to a bad path at the end). A file made by the check is removed again."""
    p = Path(path)
    existed = p.exists()
    try:
        with p.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise click.BadParameter(f"cannot write {path!r}: {exc.strerror or exc}",
                                 param_hint="--json") from None
    if not existed:
        p.unlink(missing_ok=True)


def first_error(results: list[RequestResult]) -> str | None:
    """The first failed request's error message (None when none failed)."""
    return next((r.error or "incomplete stream" for r in results if not r.ok), None)


def _fmt(x: float | None, scale: float = 1e3) -> str:
    return "-" if x is None else f"{x * scale:.1f}"


def print_summary(s: dict) -> None:
    """The summary as a table (milliseconds for latencies)."""
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=False)
    con.print(f"requests {s['completed']}/{s['requests']} ok, {s['failed']} failed {s['errors'] or ''}; "
              f"{s['duration_s']:.2f} s; {s['request_throughput']:.2f} req/s; "
              f"{s['output_token_throughput']:.1f} output tok/s; "
              f"{s['total_token_throughput']:.1f} total tok/s; "
              f"cached prompt tokens {s['cached_tokens']}/{s['prompt_tokens']}")
    table = Table("latency (ms)", "mean", "p50", "p90", "p99")
    for key, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "end-to-end")):
        st = s[key]
        table.add_row(label, _fmt(st["mean"]), _fmt(st["p50"]), _fmt(st["p90"]), _fmt(st["p99"]))
    con.print(table)
    slo = s["slo"]
    if slo["ttft_s"] is not None or slo["tpot_s"] is not None:
        con.print(f"SLO (TTFT <= {_fmt(slo['ttft_s'])} ms, TPOT <= {_fmt(slo['tpot_s'])} ms): attainment "
                  f"{slo['attainment'] * 100:.1f}%, goodput {slo['goodput_rps']:.2f} req/s")


@click.command()
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The server's base URL.")
@click.option("--model", default=None, help="Model id to send (default: the server's first /v1/models id).")
@click.option("-n", "--num-requests", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--rate", default="10", show_default=True, help="Requests (sessions) per second, or inf.")
@click.option("--burstiness", type=FiniteRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Gamma shape of the arrival gaps: 1 = Poisson, < 1 burstier.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompt-median", type=_POS, default=_P[0], show_default=True)
@click.option("--prompt-sigma", type=FiniteRange(min=0), default=_P[1], show_default=True)
@click.option("--prompt-min", type=click.IntRange(min=1), default=_P[2], show_default=True)
@click.option("--prompt-max", type=click.IntRange(min=1), default=_P[3], show_default=True)
@click.option("--output-median", type=_POS, default=_O[0], show_default=True)
@click.option("--output-sigma", type=FiniteRange(min=0), default=_O[1], show_default=True)
@click.option("--output-min", type=click.IntRange(min=1), default=_O[2], show_default=True)
@click.option("--output-max", type=click.IntRange(min=1), default=_O[3], show_default=True)
@click.option("--lengths", "lengths_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help='JSONL of {"prompt_tokens": N, "output_tokens": M} per line, used in order (cycled).')
@click.option("--turns", type=click.IntRange(min=1), default=1, show_default=True,
              help="Turns per session; each turn's prompt extends the previous one (a shared prefix).")
@click.option("--think-time", type=FiniteRange(min=0), default=0.0, show_default=True,
              help="Mean seconds between a turn's answer and the next turn (exponential).")
@click.option("--shared-prefix", type=click.IntRange(min=0), default=0, show_default=True,
              help="Tokens of a system prompt common to every request.")
@click.option("--slo-ttft", type=FiniteRange(min=0, min_open=True), default=None,
              help="TTFT target, seconds (for SLO attainment and goodput).")
@click.option("--slo-tpot", type=FiniteRange(min=0, min_open=True), default=None,
              help="TPOT target, seconds.")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None)
@click.option("--temperature", type=FiniteRange(0, 2), default=0.0, show_default=True)
@click.option("--timeout", type=FiniteRange(min=1), default=600.0, show_default=True,
              help="Per-request timeout, seconds.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the spec, summary and every request's measurements here ('-' for stdout).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def load(url: str, model: str | None, num_requests: int, rate: str, burstiness: float, seed: int,
         prompt_median: float, prompt_sigma: float, prompt_min: int, prompt_max: int, output_median: float,
         output_sigma: float, output_min: int, output_max: int, lengths_file: str | None, turns: int,
         think_time: float, shared_prefix: int, slo_ttft: float | None, slo_tpot: float | None,
         max_concurrency: int | None, temperature: float, timeout: float, json_path: str | None,
         progress: bool) -> None:
    """Send a seeded workload to an OpenAI-compatible server; print TTFT/TPOT/ITL percentiles and goodput."""
    import httpx

    from phaselens.engine.loadgen import (LengthDist, LoadGenerator, WorkloadSpec, build_workload,
                                          read_lengths, results_json, summarize)

    rate_v = _rate(rate)
    base = _check_url(url)
    if json_path is not None and json_path != "-":
        _check_writable(json_path)
    if prompt_min > prompt_max:
        raise click.BadParameter(f"--prompt-min {prompt_min} > --prompt-max {prompt_max}",
                                 param_hint="--prompt-min")
    if output_min > output_max:
        raise click.BadParameter(f"--output-min {output_min} > --output-max {output_max}",
                                 param_hint="--output-min")
    lengths = None
    if lengths_file:
        try:
            lengths = tuple(read_lengths(lengths_file))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--lengths") from None
    spec = WorkloadSpec(num_requests=num_requests, rate=rate_v, burstiness=burstiness, seed=seed,
                        prompt=LengthDist(prompt_median, prompt_sigma, prompt_min, prompt_max),
                        output=LengthDist(output_median, output_sigma, output_min, output_max),
                        lengths=lengths, turns=turns, think_time_s=think_time, shared_prefix=shared_prefix)
    try:
        served = httpx.get(f"{base}/v1/models", timeout=30).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise click.ClickException(f"cannot reach an OpenAI-compatible server at {base}: {exc}") from None
    if model is None:
        model = served[0]["id"]
    requests = build_workload(spec)

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("load"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       transient=True)
        task = bar.add_task("requests", total=len(requests))
    gen = LoadGenerator(base, model, requests, temperature=temperature, max_concurrency=max_concurrency,
                        timeout_s=timeout,
                        on_done=(lambda _r: bar.advance(task)) if bar is not None else None)
    if bar is not None:
        with bar:
            results = gen.run()
    else:
        results = gen.run()
    summary = summarize(results, gen.duration_s, slo_ttft, slo_tpot)
    doc = results_json(summary, results, spec)
    doc["url"], doc["model"] = base, model
    if json_path == "-":
        click.echo(json.dumps(doc))
    else:
        print_summary(summary)
        if json_path:
            try:
                Path(json_path).write_text(json.dumps(doc) + "\n")
            except OSError as exc:  # the path went bad during the run: keep the results on stdout
                click.echo(json.dumps(doc))
                raise click.ClickException(f"cannot write --json {json_path!r} ({exc.strerror or exc}); "
                                           "the results are on stdout above") from None
    error = first_error(results)
    if summary["completed"] == 0:  # a run that measured nothing is a failure (a wrong --model, say)
        raise click.ClickException(f"every request failed; the first: {error}")
    if error is not None:
        click.echo(f"{summary['failed']} of {summary['requests']} requests failed; the first: {error}",
                   err=True)
