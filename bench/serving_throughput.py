"""Offline serving throughput of `phaselens serve` under `phaselens load` (rate inf), against the Hugging Face
``generate`` baseline of bench/hf_baseline.py on the same GPU, model and workload.

One server (API front-end plus one worker process, as `phaselens serve` runs them) is started; a warm-up burst
of short requests runs first and is not counted; then ``--num-requests`` requests of the seeded ShareGPT-like
workload (engine/loadgen.py defaults: lognormal lengths, median 98 prompt / 205 output tokens, sigma 1,
clipped to 4..2048 and 1..1024, EOS ignored, greedy) are all sent at once through the load generator, the
same client as ``phaselens load --rate inf``. Throughput is output tokens over the time from the first
send to the last response. With ``--hf-json`` (bench/hf_baseline.py's output, run before on the same GPU:
both need the card's memory) the ratio to the baseline is printed and recorded.

    eval "$(bash bench/devpath.sh)"
    python3 bench/hf_baseline.py --preset llama-3.1-8b --num-requests 128 --json-out hf.json
    python3 bench/serving_throughput.py --preset llama-3.1-8b --hf-json hf.json

Prints a summary and appends it to bench/RESULTS.md (``--results FILE`` to write elsewhere).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click
import httpx

from phaselens.engine.loadgen import LengthDist, LoadGenerator, WorkloadSpec, build_workload, summarize
from serve_latency import free_port, stop_server, wait_until_up  # bench/ is on sys.path when run as a script

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@click.command()
@click.option("--preset", default="llama-3.1-8b", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--num-requests", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--hf-json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="bench/hf_baseline.py's --json-out, for the ratio.")
@click.option("--no-shim", is_flag=True, help="Serve without the phase shim.")
@click.option("--log", "log_path", default=None, help="Server log file (default: discarded).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
@click.option("--results", default=str(RESULTS), show_default=True, help="Markdown file to append to.")
@click.option("--no-results", is_flag=True)
@click.option("--start-timeout", type=float, default=600.0, show_default=True)
def main(preset: str, device: str, num_requests: int, seed: int, max_num_seqs: int,
         max_num_batched_tokens: int, hf_json: str | None, no_shim: bool, log_path: str | None,
         json_out: str | None, results: str,
         no_results: bool, start_timeout: float) -> None:
    """Output tokens/s of the engine serving the whole workload at once, and its ratio to HF generate."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "phaselens", "serve", "--preset", preset, "--device", device, "--port",
           str(port), "--max-num-seqs", str(max_num_seqs), "--max-num-batched-tokens",
           str(max_num_batched_tokens), "--max-queue", "100000"] + (["--no-shim"] if no_shim else [])
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    t_start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(server, url, start_timeout)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        model = models[0]["id"]
        click.echo(f"server up in {time.perf_counter() - t_start:.1f} s: {model}", err=True)
        spec = WorkloadSpec(num_requests=num_requests, rate=float("inf"), seed=seed)
        warm = build_workload(replace(spec, num_requests=32, seed=seed + 1000,
                                      output=LengthDist(16, 0.0, 16, 16)))
        LoadGenerator(url, model, warm).run()
        gen = LoadGenerator(url, model, build_workload(spec), timeout_s=1800)
        res = gen.run()
        s = summarize(res, gen.duration_s)
    finally:
        stop_server(server)
    hf = json.loads(Path(hf_json).read_text()) if hf_json else None
    ratio = s["output_token_throughput"] / hf["output_token_throughput"] if hf else None
    gpu = "cpu"
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(0)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## serving throughput: {preset} on {gpu} ({stamp})\n",
             f"Machine: {platform.node()}; `python3 bench/serving_throughput.py --preset {preset} "
             f"--device {device} --num-requests {num_requests} --max-num-seqs {max_num_seqs} "
             f"--max-num-batched-tokens {max_num_batched_tokens}{' --no-shim' if no_shim else ''}`: "
             "`phaselens serve` (1 worker, Triton attention, decode CUDA graphs, shim on unless --no-shim) "
             "under the load generator at rate inf; "
             "ShareGPT-like lengths (engine/loadgen.py defaults), EOS ignored, greedy, random weights.\n",
             "| engine | requests | ok | wall s | out tok/s | req/s | TTFT p50/p90 ms | TPOT p50/p90 ms |",
             "|---|---|---|---|---|---|---|---|",
             f"| phaselens serve | {num_requests} | {s['completed']} | {s['duration_s']:.1f} | "
             f"{s['output_token_throughput']:.0f} | {s['request_throughput']:.2f} | "
             f"{_ms(s['ttft_s']['p50'])}/{_ms(s['ttft_s']['p90'])} | "
             f"{_ms(s['tpot_s']['p50'])}/{_ms(s['tpot_s']['p90'])} |"]
    if hf:
        cut = " cut at its time limit, tokens so far counted" if hf.get("cut_at_deadline") else ""
        lines.append(f"| HF transformers {hf['transformers']} generate, static batches of {hf['batch_size']} "
                     f"(bench/hf_baseline.py, first {hf['requests']} requests{cut}) | {hf['requests']} | "
                     f"{hf.get('completed_requests', hf['requests'])} | {hf['wall_s']:.1f} | "
                     f"{hf['output_token_throughput']:.0f} | "
                     f"{hf['request_throughput']:.2f} | - | - |")
        lines.append(f"\nRatio: {ratio:.2f}x HF generate (target >= 5x).")
    block = "\n".join(lines) + "\n"
    click.echo(block)
    if json_out:
        Path(json_out).write_text(json.dumps({"summary": s, "hf": hf, "ratio": ratio}))
    if not no_results:
        with open(results, "a", encoding="utf-8") as fh:
            fh.write(block)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


if __name__ == "__main__":
    main()
