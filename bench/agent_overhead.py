"""What the node agent costs: its CPU time per GPU at default settings, with the real samplers (issue 12).

On the GPU machine: starts ``phaselens agent --source gpm`` (defaults: GPM polled just before each expected
refresh, 10 ms until the cadence is known; NVML every 1 s; attribution every 5 s over 60 s) as its own
process, runs a GPU workload of 8B-shaped steps (bf16 matmul "prefill" chunks, skinny "decode" matmuls,
"mixed" steps, idle gaps) and sends one step record per step over
the agent's socket as the shim does. After a warm-up, the agent's CPU time (utime + stime from /proc) over
the measured wall time, divided by the GPUs it watches, is the figure (target: under 2% of one core per
GPU). It also checks the agent published an attribution (/metrics) and is healthy (/health).

With ``--engine PRESET`` it then runs the bundled engine on the same GPU with its shim sending to this agent
versus disabled, alternating step by step in one run (each group runs the same workload twice with the modes
swapped, so every step has a twin under the other mode; the first group is a warm-up), and reports the time
and tokens/s of each mode over the same steps (target: under 1% difference). bench/shim_overhead.py measures
the shim alone the same way, with a stand-in listener.

    python3 bench/agent_overhead.py --seconds 60 [--engine llama-3.1-8b]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import click


AB_MODES = ("agent", "disabled")


def engine_ab(preset: str, sock_path: str, rounds: int, n_requests: int, device: str = "cuda:0",
              max_tokens: int = 64) -> tuple[str, dict]:
    """Engine tokens/s with the shim sending to the agent vs disabled, alternating step by step."""
    import statistics

    import torch

    from phaselens.engine.llm_engine import EngineConfig, LLMEngine
    from phaselens.engine.sampling_params import SamplingParams
    from phaselens.serving_shim.shim import PhaseShim

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    engine = LLMEngine(EngineConfig(model=preset, device=device, enable_prefix_caching=False,
                                    shim_enabled=False, gpu_memory_utilization=0.6))
    w, c = engine.worker, engine.config
    shims = {m: PhaseShim(engine.model_config, gpu_uuid=c.gpu_uuid, engine_id="ab", role=c.role,
                          device=w.device, dtype_bytes=w.dtype_bytes, socket_path=sock_path,
                          enabled=m == "agent") for m in AB_MODES}
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(128, 1024))] for _ in range(n_requests)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    times: dict[tuple[int, int, str], tuple[float, int]] = {}
    for group in range(rounds + 1):
        for offset in range(2):
            for i, p in enumerate(prompts):
                engine.add_request(f"g{group}-{offset}-{i}", p, params)
            sync()
            i = 0
            while engine.has_unfinished_requests():
                mode = AB_MODES[(i + offset) % 2]
                engine.shim = shims[mode]
                t0 = time.perf_counter()
                tokens = sum(len(o.new_token_ids) for o in engine.step())
                if group > 0:
                    times[(group, i, mode)] = (time.perf_counter() - t0, tokens)
                i += 1
    sent = shims["agent"].stats
    for shim in shims.values():
        shim.close()
    keys = sorted({(g, i) for g, i, _ in times})
    pairs = [(times[(g, i, "agent")], times[(g, i, "disabled")]) for g, i in keys
             if (g, i, "agent") in times and (g, i, "disabled") in times]
    secs = {m: sum(p[k][0] for p in pairs) for k, m in enumerate(AB_MODES)}
    toks = {m: sum(p[k][1] for p in pairs) for k, m in enumerate(AB_MODES)}
    rate = {m: toks[m] / secs[m] for m in AB_MODES}
    paired = statistics.median([(a[0] - b[0]) / b[0] for a, b in pairs])
    diff = secs["agent"] / secs["disabled"] - 1.0
    text = (f"engine {preset} on {device}, {n_requests} requests x {max_tokens} tokens, {rounds} groups "
            f"after "
            f"a warm-up, {len(pairs)} paired steps: shim->agent {rate['agent']:.1f} tok/s, "
            f"disabled {rate['disabled']:.1f} "
            f"tok/s; time over the same steps {100 * diff:+.2f}% (target < 1%), median paired step "
            f"{100 * paired:+.2f}%; shim sent {sent.sent} dropped {sent.dropped}")
    return text, {"rate": rate, "diff": diff, "paired": paired}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"agent did not answer {url} within {timeout_s} s")


@click.command()
@click.option("--seconds", type=click.FloatRange(5, 600), default=60.0, show_default=True)
@click.option("--warmup-s", type=click.FloatRange(0, 120), default=10.0, show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=9464, show_default=True)
@click.option("--results/--no-results", default=True, help="Append to bench/RESULTS.md.")
@click.option("--trace-out", type=click.Path(path_type=Path), default=None,
              help="Also run `phaselens record` for 10 s afterwards and keep the trace here.")
@click.option("--engine", "engine_preset", default=None, help="Also A/B the engine (a preset) with the shim.")
@click.option("--rounds", type=click.IntRange(1, 50), default=4, show_default=True)
@click.option("--requests", "n_requests", type=click.IntRange(1, 1000), default=32, show_default=True)
def main(seconds: float, warmup_s: float, port: int, results: bool, trace_out: Path | None,
         engine_preset: str | None, rounds: int, n_requests: int) -> None:
    import torch

    from phaselens.phase import Clock, Phase, Role
    from phaselens.serving_shim.device import gpu_uuid_for
    from phaselens.trace import StepRecord, dumps

    dev = torch.device("cuda:0")
    uuid = gpu_uuid_for(dev)
    sock_path = f"/tmp/phaselens-bench-{os.getpid()}.sock"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    agent = subprocess.Popen([sys.executable, "-m", "phaselens", "agent", "--source", "gpm", "--socket-path",
                              sock_path, "--listen-address", "127.0.0.1", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(base + "/health", 60)
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        w = torch.randn(57344, 8192, device=dev, dtype=torch.bfloat16)
        x = torch.randn(16, 8192, device=dev, dtype=torch.bfloat16)
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.setblocking(False)
        rng = random.Random(0)
        sent = dropped = 0
        n = 0

        def run_for(duration_s: float) -> None:
            nonlocal sent, dropped, n
            end = time.monotonic() + duration_s
            while time.monotonic() < end:
                phase = rng.choice([Phase.DECODE] * 8 + [Phase.PREFILL, Phase.MIXED])
                reps = {Phase.DECODE: 30, Phase.PREFILL: 32, Phase.MIXED: 8}[phase]
                t0 = time.time_ns()
                for _ in range(reps):
                    if phase != Phase.DECODE:
                        torch.matmul(a, b)
                    if phase != Phase.PREFILL:
                        for _ in range(1 if phase == Phase.DECODE else 3):
                            torch.matmul(x, w.t())
                torch.cuda.synchronize()  # host-clock steps are enough here: this measures the agent's cost
                t1 = time.time_ns()
                rec = StepRecord(uuid, "bench", Role.COLOCATED, phase, n, t0, t1, Clock.HOST, 0, 0, 1,
                                 0, 0.0, 0.0)
                n += 1
                try:
                    sender.sendto(dumps(rec).encode(), sock_path)
                    sent += 1
                except OSError:
                    dropped += 1
                if rng.random() < 0.03:
                    time.sleep(rng.uniform(0.005, 0.1))

        run_for(warmup_s)
        c0, w0 = cpu_seconds(agent.pid), time.monotonic()
        run_for(seconds)
        c1, w1 = cpu_seconds(agent.pid), time.monotonic()
        ab_text = ""
        if engine_preset:
            del a, b, w, x
            torch.cuda.empty_cache()
            c2, w2 = cpu_seconds(agent.pid), time.monotonic()
            ab_text, _ = engine_ab(engine_preset, sock_path, rounds, n_requests)
            c3, w3 = cpu_seconds(agent.pid), time.monotonic()
            ab_text += (f"\nagent CPU during the engine A/B: {100 * (c3 - c2) / (w3 - w2):.2f}% of one core "
                        f"({w3 - w2:.0f} s)")
            print(ab_text, flush=True)
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        try:
            health = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
        except urllib.error.HTTPError as exc:
            health = json.loads(exc.read())
    finally:
        agent.terminate()
        agent.wait(10)
    gpus = max(1, len(health.get("gpus", [])))
    share = (c1 - c0) / (w1 - w0) / gpus
    lines = [ln for ln in metrics.splitlines() if ln.startswith("phaselens_phase_utilization_ratio{")
             and f'gpu_uuid="{uuid}"' in ln]
    name = torch.cuda.get_device_name(0)
    text = (f"agent CPU: {c1 - c0:.2f} s over {w1 - w0:.1f} s wall, {gpus} GPU(s): "
            f"{100 * share:.2f}% of one core per GPU (target < 2%)\n"
            f"steps sent {sent}, dropped {dropped}; agent health {health.get('status')}; "
            f"shim received {health.get('shim_received')} rejected {health.get('shim_rejected')}\n"
            f"published per-phase series for {uuid}: {len(lines)}; tensor_active by phase: "
            + ", ".join(ln.split('phase="')[1].split('"')[0] + "=" + f"{float(ln.rsplit(' ', 1)[1]):.3f}"
                        for ln in sorted(lines) if 'metric="tensor_active"' in ln))
    if ab_text:
        text += "\n" + ab_text
    print(text)
    if trace_out is not None:
        subprocess.run([sys.executable, "-m", "phaselens", "record", str(trace_out), "--source", "gpm",
                        "--duration-s", "10", "--socket-path", sock_path + ".rec"], env=env, check=True)
    if results:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as fh:
            fh.write(f"\n## agent overhead ({stamp}, {name}, {platform.node()})\n\n"
                     f"`python3 bench/agent_overhead.py {' '.join(sys.argv[1:])}` "
                     f"(defaults: GPM polls locked to its refresh cadence, NVML 1 s, "
                     f"attribution every 5 s over 60 s)\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
