"""The advisor against reality on N GPUs (issues 8 and 11): predicted vs measured goodput per configuration.

One workload per call (``--workload long|short``), on a machine with ``--gpus N`` GPUs (``nvidia-h200-x2`` for
N=2, issue 8; ``nvidia-h200-x4`` for N=4, issue 11):

1. **Profile** (``--collect-profile``, once): step records of the 8B preset on ``cuda:0`` over a sweep of
   prompt lengths and batch sizes (``bench/profile_steps.py``, its own process so its GPU memory is freed);
   the advisor fits its step-time model to them. Otherwise ``--profile`` names an earlier one
   (``tests/fixtures/validation/profile_h200_8b_long.jsonl`` is an H200 profile of the long workload's
   engine build).
2. **Link**: a plain peer copy ``cuda:0 -> cuda:1`` (256 MiB, median of 10 after warm-up): the KV link
   bandwidth the advisor is given. With N > 2 only that one pair is measured and taken for every prefill ->
   decode pair (one host, NVLink between every pair; the report says so).
3. **Workload sample**: the server (``phaselens serve``, N workers, one per GPU, colocated) takes
   ``--sample-requests`` requests of the workload at a low rate with its request log on; that log is what the
   operator would hand the advisor. ``--sample-log`` reuses one instead (an earlier call's, or the fixture
   ``tests/fixtures/validation/requests_<workload>_sample.jsonl``), so that calls share the prediction.
4. **Prediction**, made before any measurement: the advisor for G=N at TP1 on the profile and the sample log,
   with the SLOs, ``--attainment 0.9``, the measured link, the server's chunk budget and ``--max-num-seqs``,
   simulating load runs of the measurement's length (``--run-seconds``): the simulated goodput of every
   configuration measured (``advisor/validate.py`` ``predict_goodput(..., every_placement=True)``;
   ``--predict-seeds`` seeds), and ``phaselens advise --json`` run with the same inputs for its verdict and
   its own two finalists (best colocated, best split: on N > 2 the best split may leave GPUs idle).
5. **Measurement**: for each configuration of ``--configs`` (``colocated`` = N replicas; ``P:D`` = P prefill
   and D decode workers, P + D = N), the server flipped through ``POST /admin/mode``, the highest Poisson rate
   at which at least 90% of requests meet both SLOs (TTFT and TPOT), by bisection over real load runs
   (``engine/loadgen.py``) until the bracket is within 8% or ``--max-runs`` runs. Each run sends about
   ``--run-seconds`` of arrivals; a run counts every request it sent.
6. **First runs**: with two configurations (N=2: colocated and split 1:1) both searches start at the same rate
   (the lower prediction) with the same seeded requests, and those first runs give both modes' inter-token
   latency p99 and p50 at one load (the "stalls disappear" claim). With more, each search starts at its own
   prediction (fewer runs to bracket) and the first runs' ITL is reported at their own rates.

Report: per configuration predicted vs measured goodput and the error, the predicted and measured rank
order, and whether the predicted top two are the measured top two, in order (issue 11's rule). On two GPUs
the 1:1 split is reported under the key ``split`` and the output is issue 8's (its replay test reads
``tests/fixtures/validation/measured_*.json`` written by this script).

Writes ``validate_<workload>.json`` (everything; rewritten after every load run, ``"partial": true`` until
the end, so a call cut off by its time limit still leaves its runs), ``profile.jsonl`` (when collected), the
sample request log ``requests_<workload>.jsonl`` and a Markdown block into ``--out-dir``; appends the block to
``--results``. ``--predict-only`` stops after step 4 without a server (no GPU: needs ``--profile`` and
``--sample-log``; ``--link-bytes-per-s`` gives the link) and writes ``predict_<workload>.json``.
``--combine A.json B.json ...`` merges validations of one workload measured over several calls (same
prediction inputs, different ``--configs``) into one report.

Wall time (H200, 8B, long workload): the two-GPU call took 283 s (9 load runs of 12 s, about 20 s each with
the drain, a 40-request sample of 36 s, the server's start). Four configurations of up to ``--max-runs``
runs each: with ``--run-seconds 12 --max-runs 5`` and ``--sample-log`` (no sample run) about
4 x 5 x 20 s + 90 s start and prediction = ~490 s, under the device's 10 minutes per command; ``--budget-s``
stops starting load runs that would end past it (the searches cut short say so). Otherwise split over calls:
``--configs colocated,2:2`` then ``--configs 1:3,3:1`` with the same ``--profile`` and ``--sample-log``,
then ``--combine``.

    eval "$(bash bench/devpath.sh)"; python3 bench/validate_advisor.py --workload long --collect-profile \
        --out-dir $OUT
    eval "$(bash bench/devpath.sh)"; python3 bench/validate_advisor.py --workload long --gpus 4 \
        --configs colocated,1:3,2:2,3:1 --profile tests/fixtures/validation/profile_h200_8b_long.jsonl \
        --sample-log tests/fixtures/validation/requests_long_sample.jsonl --run-seconds 12 --max-runs 5 \
        --budget-s 560 --out-dir $OUT
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import click
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import free_port, stop_server, wait_until_up  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: joint SLO attainment that defines goodput (DistServe's definition, and the issue's)
ATTAINMENT = 0.9
#: the server's max_num_seqs per worker (the engine's default), told to the advisor too
MAX_NUM_SEQS = 64
#: the GPU the advisor is told about on a CPU smoke run (the profile's meta names no GPU with known peaks)
SMOKE_GPU = "NVIDIA H100 80GB HBM3"
#: bisection stops when the bracket is within this fraction of its lower end
BRACKET = 0.08
#: seconds a load run may take after its last arrival (--budget-s): the long workload's last requests need
#: TTFT + 300 tokens x TPOT (about 8 s at the SLOs), more when the run overloads the server
DRAIN_S = 15.0
#: the workload sample's rate (req/s), kept low: what a lightly loaded server logs
SAMPLE_RATES = {"long": 1.5, "short": 5.0, "smoke": 2.0}


@dataclass(frozen=True)
class Workload:
    """Lengths (lognormal: median, sigma, clip) and the SLOs the workload is judged by."""

    name: str
    prompt: tuple[float, float, int, int]
    output: tuple[float, float, int, int]
    ttft_ms: float
    tpot_ms: float


#: The issue's two workloads: about 4k prompt / 300 output tokens, and about 200 / 200. SLOs are chosen for
#: interactive use on an 8B model: a long prompt may take 1.5 s to the first token, a short one 300 ms; a
#: token every 20 ms at P90 (50 tokens/s, well above reading speed, and tight enough that prefill chunks
#: inside decode steps matter).
WORKLOADS = {
    "long": Workload("long", (4000.0, 0.1, 3500, 4500), (300.0, 0.1, 250, 350), ttft_ms=1500.0, tpot_ms=20.0),
    "short": Workload("short", (200.0, 0.1, 150, 250), (200.0, 0.1, 150, 250), ttft_ms=300.0, tpot_ms=20.0),
    # the procedure end to end on CPU with the tiny preset (tests, and a dry run before device time)
    "smoke": Workload("smoke", (48.0, 0.2, 16, 96), (8.0, 0.1, 6, 10), ttft_ms=2000.0, tpot_ms=500.0),
}


def _utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------- configurations


def parse_configs(text: str | None, gpus: int) -> list[str]:
    """The configurations to measure, in order: ``colocated`` and ``P:D`` splits of ``gpus`` TP1 workers
    (default: every one of them, which for two GPUs is issue 8's ``colocated,1:1``)."""
    from phaselens.advisor.validate import placement_names

    every = placement_names(gpus)
    if text is None:
        return every
    configs = [c.strip() for c in text.split(",") if c.strip()]
    if not configs:
        raise click.BadParameter("no configuration given", param_hint="--configs")
    bad = [c for c in configs if c not in every]
    if bad:
        raise click.BadParameter(f"{', '.join(bad)}: not a configuration of {gpus} GPUs at TP1 "
                                 f"(one of {', '.join(every)})", param_hint="--configs")
    if len(set(configs)) != len(configs):
        raise click.BadParameter(f"a configuration is named twice: {text}", param_hint="--configs")
    return configs


def split_counts(config: str) -> tuple[int, int] | None:
    """(prefill, decode) workers of a ``P:D`` configuration; None for colocated."""
    if config == "colocated":
        return None
    p, d = config.split(":")
    return int(p), int(d)


def mode_body(config: str) -> dict[str, Any]:
    """The ``POST /admin/mode`` body that puts the server in ``config``."""
    counts = split_counts(config)
    if counts is None:
        return {"mode": "colocated"}
    return {"mode": "split", "prefill": counts[0], "decode": counts[1]}


def mode_key(config: str, gpus: int) -> str:
    """The report's key of a configuration: its name, except that on two GPUs the only split, 1:1, is
    ``split`` (issue 8's reports and the replay test that reads them)."""
    return "split" if gpus == 2 and config == "1:1" else config


# ---------------------------------------------------------------------- the machine


def measure_link(src: str = "cuda:0", dst: str = "cuda:1", nbytes: int = 256 << 20) -> float:
    """Bytes per second of a plain peer copy ``src -> dst`` (median of 10, after 3 warm-ups; synchronized)."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device=src).random_(0, 255)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dst)
    times = []
    for i in range(13):
        torch.cuda.synchronize(src)
        torch.cuda.synchronize(dst)
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(dst)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times)


class Server:
    """``phaselens serve`` with ``workers`` workers (one per GPU), its request log and admin API on."""

    def __init__(self, preset: str, device: str, out_dir: Path, chunk: int, log_path: Path, workers: int = 2,
                 start_timeout_s: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = os.urandom(16).hex()
        token_file = out_dir / "admin.token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.request_log = log_path
        self.log_file = open(out_dir / "server.log", "w")
        cmd = [sys.executable, "-m", "phaselens", "serve", "--preset", preset, "--workers", str(workers),
               "--device", device, "--port", str(self.port), "--request-log", str(log_path),
               "--admin-token-file", str(token_file), "--max-num-batched-tokens", str(chunk),
               "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queue", "4096", "--no-prefix-caching",
               # step records to files (to set the step model against serving steps), no agent socket
               "--shim-jsonl", str(out_dir / "serve_steps_{worker}.jsonl"),
               "--shim-socket", str(out_dir / "no-agent.sock")]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_until_up(self.proc, self.url, start_timeout_s)

    def set_mode(self, config: str) -> dict[str, Any]:
        """Flip the server to ``config`` (``colocated`` or ``P:D``); the server's answer."""
        r = httpx.post(f"{self.url}/admin/mode", json=mode_body(config), timeout=600,
                       headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code != 200:
            raise click.ClickException(f"mode change to {config} failed: {r.status_code} {r.text}")
        return dict(r.json())

    def close(self) -> None:
        stop_server(self.proc)
        self.log_file.close()


def load_run(url: str, model: str, wl: Workload, rate: float, n: int, seed: int) -> dict[str, Any]:
    """One load run: ``n`` requests of the workload, Poisson arrivals at ``rate``; the loadgen summary."""
    from phaselens.engine.loadgen import LengthDist, LoadGenerator, WorkloadSpec, build_workload, summarize

    spec = WorkloadSpec(num_requests=n, rate=rate, seed=seed, prompt=LengthDist(*wl.prompt),
                        output=LengthDist(*wl.output))
    gen = LoadGenerator(url, model, build_workload(spec), timeout_s=600.0)
    results = gen.run()
    summary = summarize(results, gen.duration_s, wl.ttft_ms / 1e3, wl.tpot_ms / 1e3)
    summary["rate"] = rate
    return summary


def _requests_for(rate: float, run_s: float) -> int:
    """Requests of a load run with ``run_s`` seconds of arrivals, within the bounds the advisor's
    ``--run-seconds`` simulation uses too (so prediction and measurement run the same experiment)."""
    from phaselens.advisor.search import RUN_MAX_REQUESTS, RUN_MIN_REQUESTS

    return int(min(RUN_MAX_REQUESTS, max(RUN_MIN_REQUESTS, round(rate * run_s))))


def find_goodput(url: str, model: str, wl: Workload, guess: float, run_s: float, max_runs: int, seed: int,
                 log: list[dict[str, Any]], may_run: Callable[[float], bool] = lambda rate: True,
                 after_run: Callable[[], None] = lambda: None) -> float:
    """Highest rate meeting ``ATTAINMENT`` joint attainment, by bracketing from ``guess`` then bisection
    until the bracket is within ``BRACKET`` or ``max_runs`` runs were made. Every run goes into ``log``
    (then ``after_run`` is called); no run at ``rate`` starts once ``may_run(rate)`` says no (the call's
    time budget)."""

    def passes(rate: float) -> bool:
        s = load_run(url, model, wl, rate, _requests_for(rate, run_s), seed + len(log))
        ok = s["slo"]["attainment"] is not None and s["slo"]["attainment"] >= ATTAINMENT
        log.append({"rate": rate, "attainment": s["slo"]["attainment"], "passes": ok, "summary": s})
        click.echo(f"    rate {rate:6.2f} req/s: attainment {s['slo']['attainment']:.3f} "
                   f"(TTFT p90 {s['ttft_s']['p90'] or 0:.3f} s, TPOT p90 {s['tpot_s']['p90'] or 0:.4f} s, "
                   f"failed {s['failed']}) -> {'pass' if ok else 'fail'}")
        after_run()
        return ok

    def more(rate: float) -> bool:
        return len(log) < max_runs and may_run(rate)

    lo, hi = 0.0, float("inf")
    rate = max(guess, 0.1)
    while (hi == float("inf") or lo == 0.0) and more(rate):
        if passes(rate):
            lo = rate
        else:
            hi = rate
        if lo > 0 and hi < float("inf"):
            break
        # far off (under half the requests meet the SLOs): a bigger step towards the bracket
        far = log[-1]["attainment"] is not None and log[-1]["attainment"] < 0.5
        rate = rate * 1.4 if lo > 0 else rate / (3.0 if far else 1.4)
    while lo > 0 and hi < float("inf") and (hi - lo) / lo > BRACKET and more((lo + hi) / 2):
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------- prediction


def predict(preset: str, profile: Path, request_log: Path, wl: Workload, link_bytes_per_s: float | None,
            chunk: int, run_s: float, gpus: int, configs: list[str], seeds: int, html: Path | None,
            smoke_gpu: bool) -> dict[str, Any]:
    """The advisor for G=``gpus`` at TP1 on the profile and the sample request log, simulating load runs of
    the measurement's length (``run_s``: a short run from an empty server lets a TTFT-limited mode pass rates
    above its steady state): the simulated goodput of every configuration (``predict_goodput(...,
    every_placement=True)``), then ``phaselens advise --json`` with the same inputs for the verdict (run as a
    user would; its two finalists are checked against ``predict_goodput``'s). The report's prediction part."""
    from phaselens.advisor.validate import predict_goodput, rank

    kv_link_gbps = 400.0 if link_bytes_per_s is None else link_bytes_per_s * 8 / 1e9
    p = predict_goodput(profile, request_log=request_log, ttft_ms=wl.ttft_ms, tpot_ms=wl.tpot_ms,
                        attainment=ATTAINMENT, gpus=gpus, tp=1, kv_link_gbps=kv_link_gbps, preset=preset,
                        chunk_budget=chunk, max_num_seqs=MAX_NUM_SEQS, run_s=run_s, seeds=seeds,
                        gpu_name=SMOKE_GPU if smoke_gpu else None, every_placement=True)
    cmd = list(p.command)
    # the command names a blank --html (none); the validation keeps the page
    cmd[cmd.index("--html") + 1] = "" if html is None else str(html)
    if smoke_gpu:
        cmd += ["--gpu", SMOKE_GPU]
    out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise click.ClickException(f"advise failed ({out.returncode}): {out.stderr[-2000:]}")
    advice = json.loads(out.stdout)
    rps = advice["predicted_goodput_rps"]
    fin = advice["finalists"]
    agree = all(a is None and b is None or a is not None and b is not None and abs(a / b - 1) < 1e-6
                for a, b in ((rps["colocated"], p.colocated_rps), (rps["split"], p.split_rps)))
    if not agree:
        click.echo(f"warning: phaselens advise's finalists ({rps}) differ from predict_goodput's "
                   f"(colocated {p.colocated_rps}, split {p.split_rps})", err=True)
    keys = {c: mode_key(c, gpus) for c in configs}
    predicted = {keys[c]: p.placements.get(c) for c in configs}
    return {
        # issue 8's fields: the advisor's own finalists and verdict
        "predicted": {"colocated": rps["colocated"], "split": rps["split"],
                      "colocated_label": (fin["colocated"] or {}).get("label"),
                      "split_label": (fin["split"] or {}).get("label"), "verdict": advice["verdict"],
                      "margin": advice.get("margin"), "gain": advice.get("gain")},
        "advise_command": shlex.join(cmd),
        "advise_agrees": agree,
        "predicted_configs": predicted,
        "predicted_labels": {keys[c]: p.placement_labels.get(c) for c in configs},
        "predicted_by_seed": {keys[c]: p.placement_by_seed.get(c) for c in configs},
        "predicted_all": {mode_key(c, gpus): v for c, v in p.placements.items()},
        "predicted_rank": rank(predicted),
        "predict_settings": {"profile": str(profile), "request_log": str(request_log), "gpus": gpus,
                             "kv_link_gbps": kv_link_gbps, "chunk_budget": chunk,
                             "max_num_seqs": MAX_NUM_SEQS, "run_s": run_s, "seeds": seeds,
                             "attainment": ATTAINMENT},
        "advisor_gpu": p.advice.cluster.gpu.name,
        "_advice": advice,
    }


# ---------------------------------------------------------------------- report


def judge(r: dict[str, Any]) -> None:
    """Fill the comparison fields of a report with measurements: errors, rank orders, the top-two rule."""
    from phaselens.advisor.validate import rank, top_two_match

    pred, meas = r["predicted_configs"], r["measured"]
    r["errors"] = {k: (pred[k] / meas[k] - 1 if pred.get(k) and meas.get(k) else None) for k in meas}
    r["measured_rank"] = rank(meas)
    r["predicted_rank"] = rank({k: pred.get(k) for k in meas})
    # no order to match where fewer than two configurations carried any load within the SLOs
    ranked = sum(1 for v in meas.values() if v) >= 2
    r["top_two_match"] = top_two_match(pred, meas) if ranked else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def _rps(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _head(r: dict[str, Any]) -> list[str]:
    wl = r["workload"]
    return [f"- workload: prompt lognormal median {wl['prompt'][0]:.0f} (sigma {wl['prompt'][1]}, "
            f"{wl['prompt'][2]}..{wl['prompt'][3]}), output median {wl['output'][0]:.0f} "
            f"({wl['output'][2]}..{wl['output'][3]}), Poisson arrivals",
            f"- SLOs: TTFT <= {wl['ttft_ms']:.0f} ms and TPOT <= {wl['tpot_ms']:.0f} ms per request, "
            f"goodput = highest rate with >= {r['attainment']:.0%} of requests meeting both"]


def _verdict(r: dict[str, Any]) -> str:
    pred = r["predicted"]
    split = (f"best split {pred['split_label']} {_rps(pred['split'])} req/s"
             if pred.get("split_label") else "no split")
    return (f"- `phaselens advise` for G={r['gpus']}: verdict **{pred['verdict']}** (its finalists: "
            f"{pred['colocated_label']} {_rps(pred['colocated'])} req/s, {split})")


def markdown(r: dict[str, Any]) -> str:
    """The RESULTS.md block of one validation (one call, or several combined)."""
    pred, meas, labels = r["predicted_configs"], r["measured"], r["predicted_labels"]
    gpus = r["gpus"]
    link = r["link_bytes_per_s"]
    lines = [f"## advisor vs reality, {r['workload']['name']} workload, {r['preset']} on {gpus}x {r['gpu']} "
             f"({r['finished']})", "", *_head(r),
             f"- server: `phaselens serve --preset {r['preset']} --workers {gpus} --device {r['device']} "
             f"--max-num-batched-tokens {r['chunk']} --max-num-seqs {MAX_NUM_SEQS} --max-queue 4096 "
             "--no-prefix-caching --shim-jsonl ...`; configurations through `POST /admin/mode` "
             f"(colocated = {gpus} replicas; P:D = P prefill, D decode workers)",
             f"- link cuda:0 -> cuda:1 (plain peer copy): {(link or 0) / 1e9:.1f} GB/s"
             + (" (0: CPU run, the advisor's default link)" if not link else "")
             + (f"; the one pair measured, taken for every prefill -> decode pair of the {gpus}" if gpus > 2
                else ""),
             f"- prediction, before any load run ({r['predict_settings']['seeds']} seed(s), "
             f"{r['predict_settings']['run_s']:g}-s runs): `{r['advise_command']}`"
             + ("" if r.get("advise_agrees", True) else " (its finalists differ from predict_goodput's!)"),
             "", "| config | predicted req/s | measured req/s (first failing rate above) | error |",
             "|---|---|---|---|"]
    for k in meas:
        # the bracket says how far apart two measured configurations must be to be told apart
        hi = bracket(r["runs"].get(k, []))[1]
        above = "no run failed" if hi is None else f"{hi:.2f}"
        lines.append(f"| {k} ({labels.get(k)}) | {_rps(pred.get(k))} | {_rps(meas[k])} ({above}) | "
                     f"{_pct(r['errors'].get(k))} |")
    lines.append("")
    if r.get("top_two_match") is None:
        lines.append("- rank: fewer than two configurations measured with a goodput (meeting the SLOs at "
                     "some rate tried): no order to match")
    else:
        lines.append(f"- rank predicted {' > '.join(r['predicted_rank'])}; measured "
                     f"{' > '.join(r['measured_rank'])}: top two "
                     f"{'match' if r['top_two_match'] else 'do not match'} (issue 11's rule)")
    lines.append(_verdict(r))
    if meas.get("colocated"):
        gains = ", ".join(f"{k} {meas[k] / meas['colocated'] - 1:+.0%}" for k in meas
                          if k != "colocated" and meas[k] is not None)
        if gains:
            lines.append(f"- measured winner **{r['measured_rank'][0]}**; against colocated: {gains}")
    for k, runs in r["runs"].items():
        seq = ", ".join(f"{x['rate']:.2f}:{x['attainment']:.2f}{'+' if x['passes'] else '-'}" for x in runs)
        cut = " (cut short by the time budget)" if k in r.get("cut_short", []) else ""
        lines.append(f"- {k} runs (rate:attainment): {seq}{cut}")
    unmeasured = [k for k in r.get("cut_short", []) if k not in meas]
    if unmeasured:
        lines.append(f"- not measured (the call's time budget was spent): {', '.join(unmeasured)}")
    first = r.get("same_load") or {}
    if first:
        rates = {v["rate"] for v in first.values()}
        what = f"same load ({rates.pop():.2f} req/s)" if len(rates) == 1 else "first runs"
        itl = ", ".join(f"{k} {v['itl_p50_s'] * 1e3:.1f}/{v['itl_p99_s'] * 1e3:.1f} ms"
                        + ("" if what != "first runs" else f" at {v['rate']:.2f} req/s")
                        for k, v in first.items() if v["itl_p99_s"] is not None)
        lines.append(f"- {what}: ITL p50/p99 {itl}")
    lines.append(f"- wall time {r['wall_s']:.0f} s" + (f" over {r['calls']} calls" if r.get("calls") else ""))
    return "\n".join(lines) + "\n"


def markdown_prediction(r: dict[str, Any]) -> str:
    """The RESULTS.md block of a prediction made before any measurement (``--predict-only``)."""
    st = r["predict_settings"]
    pred, labels = r["predicted_configs"], r["predicted_labels"]
    gpus = r["gpus"]
    lines = [f"## {r['finished']} — advisor prediction (G={gpus}, {r['workload']['name']} workload, "
             f"{r['preset']}), made before any {gpus}-GPU measurement", "", *_head(r),
             f"- command: `{r['command']}`",
             f"- inputs: profile `{st['profile']}`, sample request log `{st['request_log']}`; KV link "
             f"{st['kv_link_gbps']:.1f} Gb/s"
             + (f" ({r['link_bytes_per_s'] / 1e9:.1f} GB/s peer copy, given)" if r["link_bytes_per_s"] else
                " (the advisor's default: no link figure given)")
             + f"; chunk budget {st['chunk_budget']}, max-num-seqs {st['max_num_seqs']}; "
             f"{st['run_s']:g}-s load runs simulated; {st['seeds']} seeds (0..{st['seeds'] - 1}), averaged",
             f"- equivalent `phaselens advise`: `{r['advise_command']}`", "",
             "| config | placement | predicted req/s | per GPU | seeds min..max |", "|---|---|---|---|---|"]
    for k, v in pred.items():
        seeds = r.get("predicted_by_seed", {}).get(k) or []
        spread = f"{min(seeds):.2f}..{max(seeds):.2f}" if seeds else "-"
        lines.append(f"| {k} | {labels.get(k)} | {_rps(v)} | {_rps(None if v is None else v / gpus)} | "
                     f"{spread} |")
    lines += ["", f"- predicted rank: {' > '.join(r['predicted_rank'])}", _verdict(r)]
    return "\n".join(lines) + "\n"


def combine(paths: list[Path]) -> dict[str, Any]:
    """One report from validations of one workload measured over several calls (each with some of the
    configurations): the first call's prediction (the calls must share its inputs), every call's
    measurements."""
    reports = [json.loads(p.read_text()) for p in paths]
    out = dict(reports[0])
    for other in reports[1:]:
        for field in ("workload", "gpus", "preset", "chunk", "predict_settings"):
            a, b = out.get(field), other.get(field)
            if field == "predict_settings":  # the link is measured per call
                a = {k: v for k, v in (a or {}).items() if k != "kv_link_gbps"}
                b = {k: v for k, v in (b or {}).items() if k != "kv_link_gbps"}
            if a != b:
                raise click.ClickException(f"cannot combine: {field} differs ({a} vs {b})")
        for k in other["measured"]:
            if k in out["measured"]:
                raise click.ClickException(f"cannot combine: {k} measured twice")
        out["measured"] = {**out["measured"], **other["measured"]}
        out["runs"] = {**out["runs"], **other["runs"]}
        out["same_load"] = {**(out.get("same_load") or {}), **(other.get("same_load") or {})}
        out["cut_short"] = out.get("cut_short", []) + other.get("cut_short", [])
        out["predicted_configs"] = {**other["predicted_configs"], **out["predicted_configs"]}
        out["predicted_labels"] = {**other["predicted_labels"], **out["predicted_labels"]}
        out["wall_s"] = out["wall_s"] + other["wall_s"]
        out["finished"] = other["finished"]
        out["partial"] = out.get("partial", False) or other.get("partial", False)
    out["calls"] = len(reports)
    out["combined_from"] = [str(p) for p in paths]
    judge(out)
    return out


def _write(path: Path, report: dict[str, Any]) -> None:
    """Rewrite the report atomically (a call killed by its time limit leaves the last whole one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def _first_run(r: dict[str, Any]) -> dict[str, Any]:
    """A search's first run, for the same-load (or first-run) inter-token latency comparison."""
    s = r["summary"]
    return {"rate": r["rate"], "itl_p50_s": s["itl_s"]["p50"], "itl_p99_s": s["itl_s"]["p99"],
            "tpot_p90_s": s["tpot_s"]["p90"], "ttft_p90_s": s["ttft_s"]["p90"],
            "attainment": s["slo"]["attainment"], "failed": s["failed"]}


def bracket(runs: list[dict[str, Any]]) -> tuple[float, float | None]:
    """A goodput search's bracket: the highest passing rate (0: none passed) and the lowest failing rate
    above it (None: no run failed above it, the goodput is only a lower bound)."""
    lo = max((r["rate"] for r in runs if r["passes"]), default=0.0)
    above = [r["rate"] for r in runs if not r["passes"] and r["rate"] > lo]
    return lo, min(above) if above else None


def search_closed(runs: list[dict[str, Any]]) -> bool:
    """Whether a goodput search's runs bracket the goodput within ``BRACKET`` (it ended by itself)."""
    lo, hi = bracket(runs)
    return lo > 0 and hi is not None and (hi - lo) / lo <= BRACKET


def _run_entry(r: dict[str, Any]) -> dict[str, Any]:
    s = r["summary"]
    return {k: v for k, v in r.items() if k != "summary"} | {
        "ttft_p90_s": s["ttft_s"]["p90"], "tpot_p90_s": s["tpot_s"]["p90"], "itl_p99_s": s["itl_s"]["p99"],
        "failed": s["failed"], "requests": s["requests"]}


# ---------------------------------------------------------------------- the command


@click.command()
@click.option("--workload", "wl_name", type=click.Choice(sorted(WORKLOADS)), default=None,
              help="Required unless --combine.")
@click.option("--preset", default="llama-3.1-8b", show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu: a smoke run of the whole procedure (tiny preset), no GPU figures.")
@click.option("--gpus", type=click.IntRange(min=2), default=2, show_default=True,
              help="GPUs (server workers); the advisor is asked for G = this.")
@click.option("--configs", default=None,
              help="Configurations to measure, comma-separated: colocated and P:D splits with P + D = --gpus "
                   "(default: all of them; colocated,1:1 on two GPUs).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Step records to fit (default: collect them, --collect-profile).")
@click.option("--collect-profile", is_flag=True, help="Run bench/profile_steps.py on cuda:0 first.")
@click.option("--chunk", type=click.IntRange(min=64), default=2048, show_default=True,
              help="The server's --max-num-batched-tokens (colocated chunk budget).")
@click.option("--sample-requests", type=click.IntRange(min=10), default=40, show_default=True)
@click.option("--sample-rate", type=click.FloatRange(min=0.1), default=None,
              help="Rate of the workload sample, kept low (default: 1.5 req/s long, 5 short, 2 smoke); on "
                   "--device cpu the searches start there too.")
@click.option("--sample-log", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A request log of the workload to give the advisor instead of taking a sample.")
@click.option("--run-seconds", type=click.FloatRange(min=5), default=15.0, show_default=True,
              help="Seconds of arrivals per load run (and per simulated run).")
@click.option("--max-runs", type=click.IntRange(min=2), default=6, show_default=True,
              help="Load runs per configuration in the goodput search.")
@click.option("--predict-seeds", type=click.IntRange(1, 16), default=8, show_default=True,
              help="Simulation seeds of the prediction.")
@click.option("--budget-s", type=click.FloatRange(min=1), default=None,
              help="Wall seconds for the whole call: no load run starts that would end past it.")
@click.option("--predict-only", is_flag=True,
              help="Stop after the prediction (no server, no GPU): needs --profile and --sample-log.")
@click.option("--link-bytes-per-s", type=click.FloatRange(min=1), default=None,
              help="The KV link's peer-copy bytes/s to give the advisor instead of measuring it.")
@click.option("--combine", "combine_paths", multiple=True, type=click.Path(dir_okay=False, exists=True,
              path_type=Path), help="Merge these validate_<workload>.json (one workload, several calls).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS,
              show_default=True)
def main(wl_name: str | None, preset: str, device: str, gpus: int, configs: str | None, out_dir: Path,
         profile: Path | None, collect_profile: bool, chunk: int, sample_requests: int,
         sample_rate: float | None, sample_log: Path | None, run_seconds: float, max_runs: int,
         predict_seeds: int, budget_s: float | None, predict_only: bool, link_bytes_per_s: float | None,
         combine_paths: tuple[Path, ...], seed: int, results: Path) -> None:
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)

    def emit(name: str, text: str) -> None:
        (out_dir / name).write_text(text)
        click.echo(text)
        with open(results, "a") as f:
            f.write("\n" + text)

    if combine_paths:
        merged = combine(list(combine_paths))
        _write(out_dir / f"validate_{merged['workload']['name']}.json", merged)
        emit(f"validate_{merged['workload']['name']}.md", markdown(merged))
        return
    if wl_name is None:
        raise click.BadParameter("give --workload (or --combine)", param_hint="--workload")
    wl = WORKLOADS[wl_name]
    names = parse_configs(configs, gpus)
    keys = [mode_key(c, gpus) for c in names]
    if predict_only:
        if profile is None or sample_log is None:
            raise click.BadParameter("--predict-only needs --profile and --sample-log",
                                     param_hint="--predict-only")
        if collect_profile:
            raise click.BadParameter("--predict-only runs nothing on a GPU: no --collect-profile",
                                     param_hint="--collect-profile")
    elif device == "cuda":
        import torch

        if torch.cuda.device_count() < gpus:
            raise click.ClickException(f"needs {gpus} GPUs, found {torch.cuda.device_count()}")
    gpu = "cpu" if device == "cpu" else None
    if collect_profile:
        profile = out_dir / "profile.jsonl"
        click.echo(f"[{time.monotonic() - started:5.0f} s] profiling {preset} on {device} -> {profile}")
        cmd = [sys.executable, str(Path(__file__).parent / "profile_steps.py"), "--preset", preset,
               "--device", "cuda:0" if device == "cuda" else "cpu", "--out", str(profile)]
        subprocess.run(cmd + (["--quick"] if device == "cpu" else []), check=True)
    if profile is None or not profile.exists():
        raise click.BadParameter(f"no profile: {profile} (give --profile or --collect-profile)",
                                 param_hint="--profile")
    link = link_bytes_per_s
    if link is None and device == "cuda" and not predict_only:
        link = measure_link()
        click.echo(f"[{time.monotonic() - started:5.0f} s] link cuda:0 -> cuda:1: {link / 1e9:.1f} GB/s"
                   + (f" (taken for every pair of the {gpus} GPUs)" if gpus > 2 else ""))
    report: dict[str, Any] = {"workload": wl.__dict__, "gpu": gpu, "device": device, "gpus": gpus,
                              "preset": preset, "chunk": chunk, "attainment": ATTAINMENT,
                              "link_bytes_per_s": link, "link_given": link_bytes_per_s is not None,
                              "configs": keys, "started": _utc(), "partial": True,
                              "command": shlex.join(["python3", *sys.argv])}

    if predict_only:
        assert sample_log is not None
        report["gpu"] = "(from the profile)"
        report.update(predict(preset, profile, sample_log, wl, link, chunk, run_seconds, gpus, names,
                              predict_seeds, None, device == "cpu"))
        report.pop("_advice")
        report.update(partial=False, finished=_utc(), wall_s=time.monotonic() - started)
        _write(out_dir / f"predict_{wl_name}.json", report)
        emit(f"predict_{wl_name}.md", markdown_prediction(report))
        return

    if device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    report_path = out_dir / f"validate_{wl_name}.json"
    deadline = None if budget_s is None else started + budget_s

    def may_run(rate: float) -> bool:
        """Whether a load run at ``rate`` ends within the budget: its arrivals (a quarter more for a slow
        client), then the drain (the last requests' TTFT and decode, longer when overloaded)."""
        wall = _requests_for(rate, run_seconds) / rate * 1.25 + DRAIN_S
        return deadline is None or time.monotonic() + wall <= deadline

    full_log = out_dir / f"server_requests_{wl_name}.jsonl"
    server = Server(preset, device, out_dir, chunk, full_log, workers=gpus)
    runs: dict[str, list[dict[str, Any]]] = {}
    measured: dict[str, float] = {}

    def save() -> None:
        report["runs"] = {k: [_run_entry(r) for r in rs] for k, rs in runs.items()}
        report["measured"] = dict(measured)
        report["wall_s"] = time.monotonic() - started
        _write(report_path, report)

    try:
        click.echo(f"[{time.monotonic() - started:5.0f} s] server up ({server.url}, {gpus} workers)")
        sample_path = out_dir / f"requests_{wl_name}.jsonl"
        if sample_log is not None:
            shutil.copyfile(sample_log, sample_path)
            report["sample"] = {"log": str(sample_log), "reused": True}
        else:
            rate0 = sample_rate or SAMPLE_RATES.get(wl_name, 2.0)
            click.echo(f"[{time.monotonic() - started:5.0f} s] workload sample at {rate0} req/s")
            sample = load_run(server.url, preset, wl, rate0, sample_requests, seed + 1000)
            shutil.copyfile(full_log, sample_path)
            report["sample"] = {"rate": rate0, "requests": sample_requests, "summary": sample}

        # a reused log is named as given (calls sharing it share the prediction: --combine checks that)
        pred = predict(preset, profile, sample_log or sample_path, wl, link, chunk, run_seconds, gpus, names,
                       predict_seeds, out_dir / f"advice_{wl_name}.html", device == "cpu")
        (out_dir / f"advice_{wl_name}.json").write_text(json.dumps(pred.pop("_advice"), indent=1))
        report.update(pred)
        save()
        click.echo(f"[{time.monotonic() - started:5.0f} s] predicted (req/s): "
                   + ", ".join(f"{k} {_rps(v)}" for k, v in pred["predicted_configs"].items())
                   + f"; advise verdict {pred['predicted']['verdict']}")

        # with two configurations both searches start at the same rate with the same seeded requests: their
        # first runs are the same-load comparison; with more, each starts at its own prediction
        known = [v for v in pred["predicted_configs"].values() if v]
        common = min(known) if known else 1.0
        start = {k: (common if len(keys) == 2 else pred["predicted_configs"].get(k) or common) for k in keys}
        if device == "cpu":
            # the prediction is of a GPU this run does not have (the smoke's tiny model at H100 peaks):
            # start where the CPU workers are known to keep up, the sample's rate, so the search brackets
            start = dict.fromkeys(keys, sample_rate or SAMPLE_RATES[wl_name])
        report["start_rates"] = start
        report["mode_changes"] = {}
        report["cut_short"] = []
        mode = "colocated"  # the server starts colocated
        for config, key in zip(names, keys):
            if not may_run(start[key]):
                click.echo(f"[{time.monotonic() - started:5.0f} s] time budget spent: {key} not measured")
                report["cut_short"].append(key)
                continue
            if config != mode:
                report["mode_changes"][key] = server.set_mode(config)
                if key == "split":
                    report["mode_change"] = report["mode_changes"][key]  # issue 8's field
                mode = config
            click.echo(f"[{time.monotonic() - started:5.0f} s] measuring {key}")
            runs[key] = []
            measured[key] = find_goodput(server.url, preset, wl, start[key], run_seconds, max_runs, seed + 1,
                                         runs[key], may_run, save)
            if len(runs[key]) < max_runs and not search_closed(runs[key]):
                report["cut_short"].append(key)  # stopped by the time budget, not by its own rule
            save()

        report["same_load"] = {k: _first_run(rs[0]) for k, rs in runs.items() if rs}
    finally:
        server.close()
    report.update(partial=False, finished=_utc())
    save()
    judge(report)
    _write(report_path, report)
    emit(f"validate_{wl_name}.md", markdown(report))


if __name__ == "__main__":
    main()
