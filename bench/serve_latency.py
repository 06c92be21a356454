"""Serving latency of `phaselens serve` under `phaselens load`: throughput and TTFT/ITL/TPOT percentiles at
several request rates (Poisson arrivals, ShareGPT-like lengths: engine/loadgen.py documents them).

One server process (the API front-end) and one worker process per GPU, exactly as `phaselens serve` runs
them; the client is the load generator, in this process. Before the measured rates, a warm-up burst runs
(CUDA kernels compiled and cached, allocator warmed) and is not counted. Each rate sends
``rate * --duration`` requests and waits for all of them, so an overloaded rate shows its queueing in TTFT.
The server's own TTFT histogram count is checked against the client's count for each rate.

    eval "$(bash bench/devpath.sh)"
    python3 bench/serve_latency.py --preset llama-3.1-8b --device cuda --rates 2,5,10 --duration 30

Prints a table and appends it to bench/RESULTS.md (``--results FILE`` to write elsewhere); ``--out DIR``
also keeps the JSON of every request and the server's request log.
"""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click
import httpx

from phaselens.engine.loadgen import LengthDist, LoadGenerator, WorkloadSpec, build_workload, summarize

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return platform.processor() or "cpu"


def _server_ttft_count(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "phaselens_engine_time_to_first_token_seconds_count":
                total += s.value
    return total


def stop_server(server: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds (the server drains first)."""
    server.terminate()
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_until_up(server: subprocess.Popen, url: str, timeout: float) -> None:
    """Poll ``url``/health until it answers 200; ClickException if the server exits or ``timeout`` passes.
    (bench/serving_throughput.py uses it too.)"""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise click.ClickException(f"server exited with {server.returncode} (see its log)")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise click.ClickException(f"server not up after {timeout:.0f} s")
        time.sleep(0.5)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


@click.command()
@click.option("--preset", default="llama-3.1-8b", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--workers", type=int, default=1, show_default=True)
@click.option("--rates", default="2,5,10", show_default=True, help="Request rates, comma-separated (req/s).")
@click.option("--duration", type=float, default=30.0, show_default=True, help="Seconds of arrivals per rate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-num-seqs", type=int, default=128, show_default=True)
@click.option("--max-num-batched-tokens", type=int, default=2048, show_default=True)
@click.option("--slo-ttft", type=float, default=2.0, show_default=True)
@click.option("--slo-tpot", type=float, default=0.1, show_default=True)
@click.option("--prompt-max", type=int, default=2048, show_default=True)
@click.option("--output-max", type=int, default=1024, show_default=True)
@click.option("--results", default=str(RESULTS), show_default=True, help="Markdown file to append to.")
@click.option("--out", "out_dir", default=None, help="Folder for per-request JSON and the request log.")
@click.option("--start-timeout", type=float, default=600.0, show_default=True)
def main(preset: str, device: str, workers: int, rates: str, duration: float, seed: int, max_num_seqs: int,
         max_num_batched_tokens: int, slo_ttft: float, slo_tpot: float, prompt_max: int, output_max: int,
         results: str, out_dir: str | None, start_timeout: float) -> None:
    rate_list = [float(r) for r in rates.split(",") if r.strip()]
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "phaselens", "serve", "--preset", preset, "--device", device,
           "--workers", str(workers), "--port", str(port), "--max-num-seqs", str(max_num_seqs),
           "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-queue", "100000"]
    if out is not None:
        cmd += ["--request-log", str(out / "requests.jsonl")]
    log = open(out / "server.log", "w") if out is not None else subprocess.DEVNULL
    t_start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        wait_until_up(server, url, start_timeout)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        model, max_len = models[0]["id"], int(models[0]["max_model_len"])
        print(f"server up in {time.perf_counter() - t_start:.1f} s: {model}, context {max_len}", flush=True)
        base = WorkloadSpec(seed=seed, prompt=LengthDist(98.0, 1.0, 4, min(prompt_max, max_len // 2)),
                            output=LengthDist(205.0, 1.0, 1, min(output_max, max_len // 2)))
        # warm-up: a burst of short requests, not counted
        warm = build_workload(replace(base, num_requests=16, rate=float("inf"), seed=seed + 1000,
                                      output=LengthDist(16, 0.0, 16, 16)))
        LoadGenerator(url, model, warm).run()
        for rate in rate_list:
            n = max(1, round(rate * duration))
            before = _server_ttft_count(url)
            reqs = build_workload(replace(base, num_requests=n, rate=rate))
            gen = LoadGenerator(url, model, reqs, timeout_s=1800)
            res = gen.run()
            s = summarize(res, gen.duration_s, slo_ttft, slo_tpot)
            server_n = _server_ttft_count(url) - before
            rows.append((rate, n, s, server_n))
            print(f"rate {rate:g}: {s['completed']}/{n} ok in {s['duration_s']:.1f} s, "
                  f"{s['output_token_throughput']:.0f} out tok/s, TTFT p50 {_ms(s['ttft_s']['p50'])} ms, "
                  f"ITL p50 {_ms(s['itl_s']['p50'])} ms; server counted {server_n:.0f} first tokens",
                  flush=True)
            if out is not None:
                (out / f"load_rate{rate:g}.json").write_text(json.dumps(
                    {"rate": rate, "summary": s, "requests": [r.__dict__ for r in res]}))
    finally:
        stop_server(server)
    header = ("| rate req/s | requests | ok | req/s | out tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms "
              "| TPOT p50/p90 ms | SLO attain | goodput req/s |")
    lines = [header, "|" + "---|" * 10]
    for rate, n, s, _ in rows:
        t, i, p = s["ttft_s"], s["itl_s"], s["tpot_s"]
        lines.append(f"| {rate:g} | {n} | {s['completed']} | {s['request_throughput']:.2f} | "
                     f"{s['output_token_throughput']:.0f} | "
                     f"{_ms(t['p50'])}/{_ms(t['p90'])}/{_ms(t['p99'])} | "
                     f"{_ms(i['p50'])}/{_ms(i['p90'])}/{_ms(i['p99'])} | {_ms(p['p50'])}/{_ms(p['p90'])} | "
                     f"{s['slo']['attainment'] * 100:.0f}% | {s['slo']['goodput_rps']:.2f} |")
    table = "\n".join(lines)
    print(table)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"\n## serve_latency: {preset} on {_device_name(device)} ({stamp})\n\n"
             f"Machine: {platform.node()}, {workers} worker(s) on {device}; `python3 bench/serve_latency.py "
             f"--preset {preset} --device {device} --rates {rates} --duration {duration:g}`; max_num_seqs "
             f"{max_num_seqs}, max_num_batched_tokens {max_num_batched_tokens}; Poisson arrivals, lengths "
             f"lognormal (median 98 prompt / 205 output tokens, sigma 1, ShareGPT-like), ignore_eos, greedy; "
             f"random weights. SLO: TTFT <= {slo_ttft:g} s, TPOT <= {slo_tpot * 1e3:g} ms. Client-side "
             f"times (streaming, localhost).\n\n{table}\n")
    with open(results, "a", encoding="utf-8") as fh:
        fh.write(block)
    if out is not None:
        (out / "serve_latency.md").write_text(block)


if __name__ == "__main__":
    main()
