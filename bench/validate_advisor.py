"""The advisor against reality on two GPUs (issue 8): predicted vs measured goodput, colocated vs split.

One workload per call (``--workload long|short``), on a machine with two GPUs (``nvidia-h200-x2``):

1. **Profile** (``--collect-profile``, once): step records of the 8B preset on ``cuda:0`` over a sweep of
   prompt lengths and batch sizes (``bench/profile_steps.py``, its own process so its GPU memory is freed);
   the advisor fits its step-time model to them. Otherwise ``--profile`` names an earlier one.
2. **Link**: a plain peer copy ``cuda:0 -> cuda:1`` (256 MiB, median of 10 after warm-up): the KV link
   bandwidth the advisor is given.
3. **Workload sample**: the server (``phaselens serve``, two workers, one per GPU, colocated) takes
   ``--sample-requests`` requests of the workload at a low rate with its request log on; that log is what the
   operator would hand the advisor.
4. **Prediction**: ``phaselens advise --trace PROFILE --request-log SAMPLE --gpus 2 --tp 1`` with the SLOs,
   ``--attainment 0.9`` and the measured link: its predicted goodput for colocated (two replicas, at the
   server's chunk budget) and for split 1 prefill : 1 decode, and its verdict. Made before any measurement.
5. **Measurement**: for each mode (the server flipped through ``POST /admin/mode``), the highest Poisson rate
   at which at least 90% of requests meet both SLOs (TTFT and TPOT), by bisection over real load runs
   (``engine/loadgen.py``), bracketed from the prediction. Each run sends about ``--run-seconds`` of arrivals;
   a run counts every request it sent.
6. **Same-load ITL**: both searches start at the same rate (the lower prediction) with the same seeded
   requests; those first runs give both modes' inter-token latency p99 and p50 at one load (the "stalls
   disappear" claim).

Writes ``validate_<workload>.json`` (everything), ``profile.jsonl`` (when collected), the sample request log
``requests_<workload>.jsonl`` and a Markdown block into ``--out-dir``; appends the block to ``--results``.

    eval "$(bash bench/devpath.sh)"; python3 bench/validate_advisor.py --workload long --collect-profile \
        --out-dir $OUT
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import free_port, wait_until_up  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: joint SLO attainment that defines goodput (DistServe's definition, and the issue's)
ATTAINMENT = 0.9
#: the server's max_num_seqs per worker (the engine's default), told to the advisor too
MAX_NUM_SEQS = 64


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
    """``phaselens serve`` with two workers (one per GPU), its request log and admin API on."""

    def __init__(self, preset: str, device: str, out_dir: Path, chunk: int, log_path: Path,
                 start_timeout_s: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = os.urandom(16).hex()
        token_file = out_dir / "admin.token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.request_log = log_path
        self.log_file = open(out_dir / "server.log", "w")
        cmd = [sys.executable, "-m", "phaselens", "serve", "--preset", preset, "--workers", "2", "--device",
               device, "--port", str(self.port), "--request-log", str(log_path), "--admin-token-file",
               str(token_file), "--max-num-batched-tokens", str(chunk), "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-queue", "4096", "--no-prefix-caching",
               # step records to files (to set the step model against serving steps), no agent socket
               "--shim-jsonl", str(out_dir / "serve_steps_{worker}.jsonl"),
               "--shim-socket", str(out_dir / "no-agent.sock")]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT)
        wait_until_up(self.proc, self.url, start_timeout_s)

    def set_mode(self, mode: str) -> dict[str, Any]:
        body: dict[str, Any] = {"mode": mode}
        if mode == "split":
            body.update(prefill=1, decode=1)
        r = httpx.post(f"{self.url}/admin/mode", json=body, timeout=600,
                       headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code != 200:
            raise click.ClickException(f"mode change to {mode} failed: {r.status_code} {r.text}")
        return dict(r.json())

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
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
                 log: list[dict[str, Any]]) -> float:
    """Highest rate meeting ``ATTAINMENT`` joint attainment, by bracketing from ``guess`` then bisection
    until the bracket is within 8% or ``max_runs`` runs were made. Every run goes into ``log``."""

    def passes(rate: float) -> bool:
        s = load_run(url, model, wl, rate, _requests_for(rate, run_s), seed + len(log))
        ok = s["slo"]["attainment"] is not None and s["slo"]["attainment"] >= ATTAINMENT
        log.append({"rate": rate, "attainment": s["slo"]["attainment"], "passes": ok, "summary": s})
        click.echo(f"    rate {rate:6.2f} req/s: attainment {s['slo']['attainment']:.3f} "
                   f"(TTFT p90 {s['ttft_s']['p90'] or 0:.3f} s, TPOT p90 {s['tpot_s']['p90'] or 0:.4f} s, "
                   f"failed {s['failed']}) -> {'pass' if ok else 'fail'}")
        return ok

    lo, hi = 0.0, float("inf")
    rate = max(guess, 0.1)
    while len(log) < max_runs and (hi == float("inf") or lo == 0.0):
        if passes(rate):
            lo = rate
        else:
            hi = rate
        if lo > 0 and hi < float("inf"):
            break
        # far off (under half the requests meet the SLOs): a bigger step towards the bracket
        far = log[-1]["attainment"] is not None and log[-1]["attainment"] < 0.5
        rate = rate * 1.4 if lo > 0 else rate / (3.0 if far else 1.4)
    while len(log) < max_runs and lo > 0 and hi < float("inf") and (hi - lo) / lo > 0.08:
        mid = (lo + hi) / 2
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo


def predict(preset: str, profile: Path, request_log: Path, wl: Workload, link_bytes_per_s: float | None,
            chunk: int, run_s: float, html: Path) -> dict[str, Any]:
    """``phaselens advise`` on the profile and the sample request log, for G=2 at TP1, simulating load runs
    of the measurement's length (``--run-seconds``: a short run from an empty server lets a TTFT-limited
    mode pass rates above its steady state); its JSON."""
    cmd = [sys.executable, "-m", "phaselens", "advise", "--trace", str(profile), "--request-log",
           str(request_log), "--preset", preset, "--gpus", "2", "--tp", "1", "--ttft-ms", str(wl.ttft_ms),
           "--tpot-ms", str(wl.tpot_ms), "--attainment", str(ATTAINMENT), "--chunk-budget", str(chunk),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--run-seconds", str(run_s), "--json", "--html", str(html)]
    if link_bytes_per_s is not None:
        cmd += ["--kv-link-gbps", f"{link_bytes_per_s * 8 / 1e9:.1f}"]
    else:  # CPU smoke run: the profile's meta names no GPU with known peaks; any will do for a dry run
        cmd += ["--gpu", "NVIDIA H100 80GB HBM3"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise click.ClickException(f"advise failed ({out.returncode}): {out.stderr[-2000:]}")
    advice = json.loads(out.stdout)
    advice["_command"] = " ".join(cmd)
    return dict(advice)


def predicted_goodput(advice: dict[str, Any]) -> dict[str, Any]:
    """Predicted goodput (req/s, all GPUs) of colocated and split 1:1, their labels and the verdict, from the
    advisor's JSON."""
    fin = advice["finalists"]
    rps = advice["predicted_goodput_rps"]
    return {"colocated": rps["colocated"], "split": rps["split"],
            "colocated_label": (fin["colocated"] or {}).get("label"),
            "split_label": (fin["split"] or {}).get("label"), "verdict": advice["verdict"]}


@click.command()
@click.option("--workload", "wl_name", type=click.Choice(sorted(WORKLOADS)), required=True)
@click.option("--preset", default="llama-3.1-8b", show_default=True)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="cpu: a smoke run of the whole procedure (tiny preset), no GPU figures.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--profile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Step records to fit (default: collect them, --collect-profile).")
@click.option("--collect-profile", is_flag=True, help="Run bench/profile_steps.py on cuda:0 first.")
@click.option("--chunk", type=click.IntRange(min=64), default=2048, show_default=True,
              help="The server's --max-num-batched-tokens (colocated chunk budget).")
@click.option("--sample-requests", type=click.IntRange(min=10), default=40, show_default=True)
@click.option("--sample-rate", type=click.FloatRange(min=0.1), default=None,
              help="Rate of the workload sample, kept low (default: 1.5 req/s long, 5 req/s short).")
@click.option("--run-seconds", type=click.FloatRange(min=5), default=15.0, show_default=True,
              help="Seconds of arrivals per load run.")
@click.option("--max-runs", type=click.IntRange(min=2), default=6, show_default=True,
              help="Load runs per mode in the goodput search.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=RESULTS,
              show_default=True)
def main(wl_name: str, preset: str, device: str, out_dir: Path, profile: Path | None, collect_profile: bool,
         chunk: int,
         sample_requests: int, sample_rate: float | None, run_seconds: float, max_runs: int,
         seed: int, results: Path) -> None:
    import torch

    wl = WORKLOADS[wl_name]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if device == "cuda" and torch.cuda.device_count() < 2:
        raise click.ClickException(f"needs two GPUs, found {torch.cuda.device_count()}")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    if collect_profile:
        profile = out_dir / "profile.jsonl"
        click.echo(f"[{time.monotonic() - started:5.0f} s] profiling {preset} on {device} -> {profile}")
        cmd = [sys.executable, str(Path(__file__).parent / "profile_steps.py"), "--preset", preset,
               "--device", "cuda:0" if device == "cuda" else "cpu", "--out", str(profile)]
        subprocess.run(cmd + (["--quick"] if device == "cpu" else []), check=True)
    if profile is None or not profile.exists():
        raise click.BadParameter(f"no profile: {profile} (give --profile or --collect-profile)",
                                 param_hint="--profile")
    link = measure_link() if device == "cuda" else None
    if link is not None:
        click.echo(f"[{time.monotonic() - started:5.0f} s] link cuda:0 -> cuda:1: {link / 1e9:.1f} GB/s")

    full_log = out_dir / f"server_requests_{wl_name}.jsonl"
    server = Server(preset, device, out_dir, chunk, full_log)
    report: dict[str, Any] = {"workload": wl.__dict__, "gpu": gpu, "device": device, "gpus": 2,
                              "preset": preset,
                              "chunk": chunk, "attainment": ATTAINMENT, "link_bytes_per_s": link,
                              "started": _utc()}
    try:
        click.echo(f"[{time.monotonic() - started:5.0f} s] server up ({server.url}); workload sample")
        rate0 = sample_rate or {"long": 1.5, "short": 5.0}.get(wl_name, 2.0)
        sample = load_run(server.url, preset, wl, rate0, sample_requests, seed + 1000)
        sample_log = out_dir / f"requests_{wl_name}.jsonl"
        shutil.copyfile(full_log, sample_log)
        report["sample"] = {"rate": rate0, "requests": sample_requests, "summary": sample}

        advice = predict(preset, profile, sample_log, wl, link, chunk, run_seconds,
                         out_dir / f"advice_{wl_name}.html")
        pred = predicted_goodput(advice)
        report["predicted"] = pred
        report["advise_command"] = advice.pop("_command")
        (out_dir / f"advice_{wl_name}.json").write_text(json.dumps(advice, indent=1))
        click.echo(f"[{time.monotonic() - started:5.0f} s] predicted: colocated {pred['colocated']} req/s "
                   f"({pred['colocated_label']}), split {pred['split']} req/s ({pred['split_label']}), "
                   f"verdict {pred['verdict']}")

        measured: dict[str, float] = {}
        runs: dict[str, list[dict[str, Any]]] = {}
        # both searches start at the same rate with the same seeded requests: their first runs are the
        # same-load comparison (inter-token latency p99 of both modes)
        known = [v for v in (pred["colocated"], pred["split"]) if v]
        common = min(known) if known else rate0
        for mode in ("colocated", "split"):
            if mode == "split":
                report["mode_change"] = server.set_mode("split")
            click.echo(f"[{time.monotonic() - started:5.0f} s] measuring {mode}")
            runs[mode] = []
            guess = common
            measured[mode] = find_goodput(server.url, preset, wl, guess, run_seconds, max_runs, seed + 1,
                                          runs[mode])
        report["measured"] = measured
        report["runs"] = {m: [{k: v for k, v in r.items() if k != "summary"} | {
            "ttft_p90_s": r["summary"]["ttft_s"]["p90"], "tpot_p90_s": r["summary"]["tpot_s"]["p90"],
            "itl_p99_s": r["summary"]["itl_s"]["p99"], "failed": r["summary"]["failed"],
            "requests": r["summary"]["requests"]} for r in rs] for m, rs in runs.items()}

        itl: dict[str, Any] = {}
        for mode, rs in runs.items():
            s = rs[0]["summary"]
            itl[mode] = {"rate": common, "itl_p50_s": s["itl_s"]["p50"], "itl_p99_s": s["itl_s"]["p99"],
                         "tpot_p90_s": s["tpot_s"]["p90"], "ttft_p90_s": s["ttft_s"]["p90"],
                         "attainment": s["slo"]["attainment"], "failed": s["failed"]}
        report["same_load"] = itl
    finally:
        server.close()
    report["wall_s"] = time.monotonic() - started
    report["finished"] = _utc()
    (out_dir / f"validate_{wl_name}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out_dir / f"validate_{wl_name}.md").write_text(text)
    click.echo(text)
    with open(results, "a") as f:
        f.write("\n" + text)


def markdown(r: dict[str, Any]) -> str:
    """The RESULTS.md block of one validation."""
    wl, pred, meas = r["workload"], r["predicted"], r["measured"]
    winner = max(meas, key=lambda m: meas[m])
    lines = [f"## advisor vs reality, {wl['name']} workload, {r['preset']} on 2x {r['gpu']} "
             f"({r['finished']})",
             "",
             f"- workload: prompt lognormal median {wl['prompt'][0]:.0f} (sigma {wl['prompt'][1]}, "
             f"{wl['prompt'][2]}..{wl['prompt'][3]}), output median {wl['output'][0]:.0f} "
             f"({wl['output'][2]}..{wl['output'][3]}), Poisson arrivals",
             f"- SLOs: TTFT <= {wl['ttft_ms']:.0f} ms and TPOT <= {wl['tpot_ms']:.0f} ms per request, "
             f"goodput = highest rate with >= {r['attainment']:.0%} of requests meeting both",
             f"- server: `phaselens serve --preset {r['preset']} --workers 2 --device {r['device']} "
             f"--max-num-batched-tokens {r['chunk']} --max-num-seqs {MAX_NUM_SEQS} --max-queue 4096 "
             "--no-prefix-caching --shim-jsonl ...`; split = `POST /admin/mode` prefill 1 decode 1",
             f"- link cuda:0 -> cuda:1 (plain peer copy): "
             f"{(r['link_bytes_per_s'] or 0) / 1e9:.1f} GB/s (0: CPU run, the advisor's default link)",
             f"- prediction: `{r['advise_command']}`", "",
             "| mode | predicted goodput req/s | measured req/s | predicted / measured |",
             "|---|---|---|---|"]
    for m in ("colocated", "split"):
        p = pred.get(m)
        ratio = f"{p / meas[m]:.2f}" if p and meas[m] else "-"
        lines.append(f"| {m} ({pred.get(m + '_label')}) | {p if p is None else round(p, 2)} | "
                     f"{meas[m]:.2f} | {ratio} |")
    lines += ["", f"- verdict: advisor **{pred['verdict']}**, measured winner **{winner}** "
              f"({meas['split'] / meas['colocated'] - 1:+.0%} split vs colocated)" if meas["colocated"] else
              f"- verdict: advisor {pred['verdict']}, measured winner {winner}"]
    for m, runs in r["runs"].items():
        seq = ", ".join(f"{x['rate']:.2f}:{x['attainment']:.2f}{'+' if x['passes'] else '-'}" for x in runs)
        lines.append(f"- {m} runs (rate:attainment): {seq}")
    same = r["same_load"]
    lines.append(f"- same load ({same['split']['rate']:.2f} req/s): ITL p50/p99 colocated "
                 f"{same['colocated']['itl_p50_s'] * 1e3:.1f}/{same['colocated']['itl_p99_s'] * 1e3:.1f} ms, "
                 f"split {same['split']['itl_p50_s'] * 1e3:.1f}/{same['split']['itl_p99_s'] * 1e3:.1f} ms")
    lines.append(f"- wall time {r['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
