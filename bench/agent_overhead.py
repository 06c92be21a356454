"""What the node agent costs: its CPU time per GPU at default settings (issue 12).

The agent runs as its own process, built and run exactly as ``phaselens agent`` does (``build_daemon``, the
phase receiver, the HTTP server, ``AgentDaemon.run``) at default settings (GPM polled just before each
expected refresh, 10 ms until the cadence is known; NVML every 1 s; attribution every 15 s over 60 s). This
process sends it one step record per step over its socket, as the shim does. After a warm-up, the agent's
CPU time (utime + stime of all its threads, from /proc) over the measured wall time, divided by the GPUs it
watches, is the figure (target: under 2% of one core per GPU). It also checks the agent published an
attribution (/metrics) and is healthy (/health).

``--sampler`` picks the counters the agent reads:

- ``gpm`` (the default where CUDA is available): the real NVML GPM + NVML samplers; this process runs a GPU
  workload of 8B-shaped steps (bf16 matmul "prefill" chunks, skinny "decode" matmuls, "mixed" steps, idle
  gaps) and sends the step records. The figure of record (bench/RESULTS.md) comes from this mode.
- ``fake-gpm`` (the default without CUDA): the same GPM + NVML samplers over a fake NVML with the real call
  pattern: GPM counters that refresh every 100 ms of wall time (polls between refreshes read DRAM as NaN, as
  on the H100), each ``nvmlGpmSampleGet`` spinning the ~33 us it costs on the H100, and values made from the
  steps received (the simulated sampler's H100 model). This process sends 8B-shaped step records (decode
  ~10 ms, prefill chunks ~45 ms, mixed ~20 ms) paced at ``--steps-per-s``, no GPU work.
- ``simulated``: ``--source simulated`` (the agent's own simulated counters, polled every 10 ms), same sender.

With ``--gpus N`` (fake-gpm, simulated) the agent watches N GPUs, each refreshing on its own phase, and every
step sends one record per GPU (as the ranks of a tensor-parallel engine do); the figure is per GPU.

Besides the total it prints the CPU of each agent thread (the loop: sampling, attribution; the phase receiver;
HTTP; native threads such as a BLAS pool, which a Python profile cannot see) and each sampler's last poll
time from /health. ``--profile`` also profiles the agent (cProfile on its loop and receiver threads, over the
measured window only) and prints the top 20 functions by cumulative time, blocking waits left out; the CPU
figure of a profiled run is inflated by the profiler, so measure without it. ``--json-out`` writes it all.

With ``--engine PRESET`` (GPU only) it then runs the bundled engine on the same GPU with its shim sending to
this agent versus disabled, alternating step by step in one run (each group runs the same workload twice
with the modes swapped, so every step has a twin under the other mode; the first group is a warm-up), and
reports the time and tokens/s of each mode over the same steps (target: under 1% difference).
bench/shim_overhead.py measures the shim alone the same way, with a stand-in listener.

    python3 bench/agent_overhead.py --seconds 40 --json-out agent.json           # GPU machine: real GPM
    python3 bench/agent_overhead.py --seconds 40 --no-results --profile           # CPU: fake GPM, 80 steps/s
"""

from __future__ import annotations

import cProfile
import datetime
import io
import json
import math
import os
import platform
import pstats
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import click

AB_MODES = ("agent", "disabled")
SAMPLERS = ("gpm", "fake-gpm", "simulated")
FAKE_UUID_PREFIX = "GPU-fake-"
#: what one nvmlGpmSampleGet costs on the H100 (issue 12's profile: ~33 us per call)
FAKE_SAMPLE_GET_US = 33.0
#: the NVML utilization buffer's sample period (~1/6 s on the drivers we saw)
FAKE_UTIL_SAMPLE_US = 166_667


# ---------------------------------------------------------------- a fake NVML with the real call pattern


class _NvmlError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value


class _MetricsGet:
    """Stand-in for pynvml's c_nvmlGpmMetricsGet_t (the fields the GPM sampler touches)."""

    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(98)]


class _FakeGpu:
    """One fake GPU: its refresh phase, simulated counters and the steps it ran (the last second)."""

    def __init__(self, index: int, start_ns: int, seed: int):
        from phaselens.agent.samplers.simulated import SimulatedSampler

        self.uuid = f"{FAKE_UUID_PREFIX}{index}"
        self.steps: deque[Any] = deque()
        # the simulated sampler's refresh grid starts at start_ns: its first poll, on a clock that says so
        self.sim = SimulatedSampler([self.uuid], self, seed=seed, clock=lambda: start_ns)
        self.sim.sample()
        self.sim.clock = time.time_ns
        self.start_ns = start_ns
        self.generation = 0
        self.values: dict[str, float | None] = {}

    def steps_between(self, gpu_uuid: str, t0_ns: int, t1_ns: int) -> list[Any]:
        return [s for s in self.steps if s.t0_ns <= t1_ns and s.t1_ns >= t0_ns]


class WallClockNvml:
    """H100-like GPUs whose GPM counters refresh every 100 ms of wall time, each on its own phase.

    Values come from the simulated sampler's H100 model over the steps the agent accepted (its receiver's
    ``on_step`` hands each to :meth:`observe`, kept here for the last second, and each refresh first has the
    receiver validate what has arrived: the agent's own timeline is not walked, so what the fake costs does
    not depend on the agent's code). Polls between two refreshes read
    DRAM bandwidth as NaN and the rest as 0, as NVML does on the H100."""

    NVML_SUCCESS = 0
    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_SM_OCCUPANCY = 3
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10
    NVML_GPM_METRIC_FP16_UTIL = 13
    NVML_GPM_METRICS_GET_VERSION = 1
    NVML_CLOCK_SM = 1
    NVML_GPU_UTILIZATION_SAMPLES = 1
    NVMLError = _NvmlError
    c_nvmlGpmMetricsGet_t = _MetricsGet

    def __init__(self, gpus: int = 1, sample_get_us: float = FAKE_SAMPLE_GET_US, refresh_ms: float = 100.0):
        from phaselens.agent.samplers.gpm import GPM_FIELDS

        #: GPM metric id -> the simulated sampler's key, from the GPM sampler's own catalogue
        self._key_of = {getattr(self, const): key for key, const in GPM_FIELDS.items()}
        self.sample_get_s = sample_get_us / 1e6
        self.period_ns = int(refresh_ms * 1e6)
        rng = random.Random(1)
        now = time.time_ns()
        self.gpus = [_FakeGpu(i, now - rng.randrange(self.period_ns), seed=i) for i in range(gpus)]
        self._by_uuid = {g.uuid: g for g in self.gpus}
        #: the agent's phase receiver (set by serve_agent), whose accepted steps reach :meth:`observe`
        self.receiver: Any = None

    def observe(self, step: Any) -> None:
        gpu = self._by_uuid.get(step.gpu_uuid)
        if gpu is None:
            return
        gpu.steps.append(step)
        while gpu.steps and gpu.steps[0].t1_ns < step.t1_ns - 1_000_000_000:
            gpu.steps.popleft()

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        pass

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> _FakeGpu:  # noqa: N802
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, handle: _FakeGpu) -> str:  # noqa: N802
        return handle.uuid

    def nvmlDeviceGetName(self, handle: _FakeGpu) -> str:  # noqa: N802
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=87, memory=41)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802
        return 612_000

    def nvmlDeviceGetClockInfo(self, handle: int, kind: int) -> int:  # noqa: N802
        return 1755

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=40 * 1024**3, total=80 * 1024**3)

    def nvmlDeviceGetSamples(self, handle: Any, kind: int, since_us: int  # noqa: N802
                             ) -> tuple[int, list[Any]]:
        now_us = time.time_ns() // 1000
        first = max(since_us + 1, now_us - 20 * FAKE_UTIL_SAMPLE_US)
        first += -first % FAKE_UTIL_SAMPLE_US
        rows = [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=87))
                for t in range(first, now_us + 1, FAKE_UTIL_SAMPLE_US)]
        return 1, rows

    def nvmlGpmQueryDeviceSupport(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(isSupportedDevice=1)

    def nvmlGpmSampleAlloc(self) -> Any:  # noqa: N802
        return SimpleNamespace(generation=-1, values={})

    def nvmlGpmSampleFree(self, sample: Any) -> None:  # noqa: N802
        pass

    def nvmlGpmSampleGet(self, gpu: _FakeGpu, sample: Any) -> None:  # noqa: N802
        end = time.perf_counter() + self.sample_get_s
        while time.perf_counter() < end:  # the driver call's cost
            pass
        generation = (time.time_ns() - gpu.start_ns) // self.period_ns
        if generation > gpu.generation:
            gpu.generation = generation
            if self.receiver is not None:
                # the real counters see every step the GPU ran; the agent validates received records in
                # batches (twice a second at this rate), so the fake takes what has arrived first. It makes
                # the receiver validate ~10 times a second here: this mode overstates its cost a little
                self.receiver.flush()
            rec = gpu.sim.sample()[0]
            if any(v is not None for v in rec.values.values()):
                gpu.values = rec.values
        sample.generation, sample.values = gpu.generation, gpu.values

    def nvmlGpmMetricsGet(self, mg: Any) -> None:  # noqa: N802
        same = mg.sample1.generation == mg.sample2.generation
        for m in mg.metrics[: mg.numMetrics]:
            m.nvmlReturn = 0
            if same:
                m.value = math.nan if m.metricId == self.NVML_GPM_METRIC_DRAM_BW_UTIL else 0.0
            else:
                m.value = 100.0 * (mg.sample2.values.get(self._key_of[m.metricId]) or 0.0)


# ---------------------------------------------------------------- the agent process

#: the NVML calls the GPM and NVML samplers make, timed in the agent process (what the driver costs)
NVML_CALLS = ("nvmlGpmSampleGet", "nvmlGpmMetricsGet", "nvmlDeviceGetUtilizationRates",
              "nvmlDeviceGetPowerUsage", "nvmlDeviceGetClockInfo", "nvmlDeviceGetMemoryInfo",
              "nvmlDeviceGetSamples")


class CallTimer:
    """Wraps the NVML functions the samplers call (on the pynvml module or the fake) and adds up, per
    function, calls, CPU time of the calling thread and wall time."""

    def __init__(self, nvml: Any):
        self.stats: dict[str, list[int]] = {}
        for name in NVML_CALLS:
            fn = getattr(nvml, name, None)
            if fn is not None:
                setattr(nvml, name, self._timed(name, fn))

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            try:
                return fn(*args)
            finally:
                row = self.stats.setdefault(name, [0, 0, 0])
                row[0] += 1
                row[1] += time.thread_time_ns() - c0
                row[2] += time.perf_counter_ns() - w0
        return call


def serve_agent(sampler: str, gpus: int, socket_path: str, port: int, threads_out: str,
                profile_out: str | None) -> None:
    """Run the agent as ``phaselens agent`` does, with the chosen counters. On SIGUSR1 (the measured window
    starts) write its threads' names to ``threads_out`` and, if asked, start profiling.

    The profile covers the loop thread (ticks: sample, attribute, publish) and the receiver thread (recv,
    validate, timeline, state) from the first tick / datagram after SIGUSR1 to SIGTERM."""
    from phaselens.agent.daemon import AgentConfig, build_daemon, make_http_server

    fake = WallClockNvml(gpus) if sampler == "fake-gpm" else None
    timer = None
    if sampler != "simulated":
        from phaselens.agent.samplers.nvml_common import load_nvml

        timer = CallTimer(load_nvml(fake))
    cfg = AgentConfig(source="simulated" if sampler == "simulated" else "gpm", socket_path=socket_path,
                      listen_address="127.0.0.1", port=port, simulated_gpus=gpus)
    daemon = build_daemon(cfg, nvml=fake)
    if fake is not None:
        assert daemon.receiver is not None
        daemon.receiver.on_step = fake.observe
        fake.receiver = daemon.receiver
    profiling = threading.Event()
    profilers: dict[int, cProfile.Profile] = {}

    def profiled(fn: Callable[..., Any]) -> Callable[..., Any]:
        local = threading.local()

        def call(*args: Any) -> Any:
            if profiling.is_set() and not hasattr(local, "prof"):
                local.prof = profilers[threading.get_ident()] = cProfile.Profile()
                local.prof.enable()  # stays on for this thread from here
            return fn(*args)
        return call

    def measuring(*_: Any) -> None:
        # the parent starts its measured window: name the threads (for its per-thread CPU) and profile
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        Path(threads_out).write_text(json.dumps(names))
        if timer is not None:
            timer.stats.clear()
        if profile_out:
            profiling.set()

    if profile_out:
        daemon.tick = profiled(daemon.tick)
        assert daemon.receiver is not None
        daemon.receiver.handle = profiled(daemon.receiver.handle)
    signal.signal(signal.SIGUSR1, measuring)
    daemon.start_receiver()
    server = make_http_server(daemon.state, cfg.listen_address, cfg.port)
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    try:
        daemon.run()  # closes the daemon (joins the receiver thread) when stopped
    finally:
        server.shutdown()
    if timer is not None:
        Path(threads_out).with_name("nvml.json").write_text(json.dumps(timer.stats))
    if profile_out and profilers:
        mine = profilers.pop(threading.get_ident(), None)  # the loop's; the receiver's thread has ended
        if mine is not None:
            mine.disable()
        parts = ([mine] if mine is not None else []) + list(profilers.values())
        stats = pstats.Stats(parts[0])
        for prof in parts[1:]:
            stats.add(prof)
        stats.dump_stats(profile_out)


# ---------------------------------------------------------------- step senders


class StepSender:
    """Sends step records to the agent's socket as the shim does: one per GPU per step (the ranks of a
    tensor-parallel engine step together), non-blocking, and a full queue parks records in a backlog retried
    at the next step, as serving_shim/emitter.py does."""

    def __init__(self, sock_path: str, uuids: list[str], backlog: int = 1024):
        from phaselens.trace import dumps

        self.sock_path, self.uuids, self.dumps = sock_path, uuids, dumps
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.backlog: deque[bytes] = deque(maxlen=backlog)
        self.sent = self.dropped = self.parked = self.n = 0

    def send(self, phase: Any, t0_ns: int, t1_ns: int, clock: Any, tokens: tuple[int, int] = (0, 0),
             flops: float = 0.0, nbytes: float = 0.0) -> None:
        from phaselens.phase import Role
        from phaselens.trace import StepRecord

        for uuid in self.uuids:
            rec = StepRecord(uuid, "bench", Role.COLOCATED, phase, self.n, t0_ns, t1_ns, clock, tokens[0],
                             tokens[1], 16, 16 * 1024, flops, nbytes)
            if len(self.backlog) == self.backlog.maxlen:
                self.dropped += 1  # the oldest parked record goes
            self.backlog.append(self.dumps(rec).encode())
        self.n += 1
        while self.backlog:
            try:
                self.sock.sendto(self.backlog[0], self.sock_path)
            except BlockingIOError:  # the agent's queue is full: retried at the next step
                self.parked += 1
                return
            except OSError:
                self.dropped += 1
            else:
                self.sent += 1
            self.backlog.popleft()


def paced_steps(sender: StepSender, steps_per_s: float, seed: int = 0) -> Callable[[float], None]:
    """8B-shaped steps on the host clock, no GPU work: runs of ~10 ms decode steps broken by ~45 ms prefill
    chunks or ~20 ms mixed steps (the 8B shape of bench/attribution_accuracy.py), stretched or shrunk so the
    mean step lasts 1/steps_per_s; each record is sent when its step ends, as the shim does."""
    from phaselens.phase import Clock, Phase

    rng = random.Random(seed)
    kinds = [(Phase.DECODE, 10.0)] * 17 + [(Phase.PREFILL, 45.0), (Phase.MIXED, 20.0), (Phase.MIXED, 20.0)]
    scale = 1e3 / steps_per_s / (sum(ms for _, ms in kinds) / len(kinds))
    t_next = time.time_ns()

    def run_for(duration_s: float) -> None:
        nonlocal t_next
        end = time.monotonic() + duration_s
        t_next = max(t_next, time.time_ns())
        while time.monotonic() < end:
            phase, ms = rng.choice(kinds)
            t0 = t_next
            t1 = t0 + int(ms * rng.uniform(0.8, 1.2) * scale * 1e6)
            wait = (t1 - time.time_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
            prefill = 512 if phase != Phase.DECODE else 0
            decode = 16 if phase != Phase.PREFILL else 0
            sender.send(phase, t0, t1, Clock.HOST, (prefill, decode), flops=(t1 - t0) * 5e5,
                        nbytes=(t1 - t0) * 1e3)
            t_next = t1
    return run_for


def gpu_steps(sender: StepSender, dev: Any) -> Callable[[float], None]:
    """8B-shaped steps of real GPU work (bf16 matmul prefill chunks, skinny decode matmuls, mixed steps,
    idle gaps), one record per step on the host clock."""
    import torch

    from phaselens.phase import Clock, Phase

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    w = torch.randn(57344, 8192, device=dev, dtype=torch.bfloat16)
    x = torch.randn(16, 8192, device=dev, dtype=torch.bfloat16)
    rng = random.Random(0)

    def run_for(duration_s: float) -> None:
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
            sender.send(phase, t0, time.time_ns(), Clock.HOST)
            if rng.random() < 0.03:
                time.sleep(rng.uniform(0.005, 0.1))
    return run_for


# ---------------------------------------------------------------- engine A/B (GPU)


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


# ---------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads, seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, int]:
    """CPU time of each live thread of a process, ns (/proc/<pid>/task/<tid>/schedstat, first field)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return out


def wait_for(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the agent exited ({proc.returncode}) before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"agent did not answer {url} within {timeout_s} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@click.command()
@click.option("--seconds", type=click.FloatRange(5, 600), default=60.0, show_default=True)
@click.option("--warmup-s", type=click.FloatRange(0, 120), default=60.0, show_default=True,
              help="Run before measuring; the default fills the agent's 60-s horizon, as in steady state.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Counters the agent reads [default: gpm where CUDA is available, else fake-gpm].")
@click.option("--steps-per-s", type=click.FloatRange(1, 5000), default=80.0, show_default=True,
              help="Steps per second (fake-gpm and simulated; the GPU workload sets its own).")
@click.option("--gpus", "n_gpus", type=click.IntRange(1, 64), default=1, show_default=True,
              help="GPUs the agent watches (fake-gpm and simulated): one record per GPU per step.")
@click.option("--profile", is_flag=True, help="Print the agent's cProfile top 20 by cumulative time.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0: a free one.")
@click.option("--results/--no-results", default=True, help="Append to bench/RESULTS.md.")
@click.option("--trace-out", type=click.Path(path_type=Path), default=None,
              help="Also run `phaselens record` for 10 s afterwards and keep the trace here.")
@click.option("--engine", "engine_preset", default=None, help="Also A/B the engine (a preset) with the shim.")
@click.option("--rounds", type=click.IntRange(1, 50), default=4, show_default=True)
@click.option("--requests", "n_requests", type=click.IntRange(1, 1000), default=32, show_default=True)
@click.option("--as-agent", is_flag=True, hidden=True, help="Internal: be the agent process.")
@click.option("--socket-path", default=None, hidden=True)
@click.option("--threads-out", default=None, hidden=True)
@click.option("--profile-out", default=None, hidden=True)
def main(seconds: float, warmup_s: float, sampler: str | None, steps_per_s: float, n_gpus: int, profile: bool,
         json_out: Path | None, port: int, results: bool, trace_out: Path | None, engine_preset: str | None,
         rounds: int, n_requests: int, as_agent: bool, socket_path: str | None, threads_out: str | None,
         profile_out: str | None) -> None:
    if as_agent:
        assert sampler is not None and socket_path is not None and threads_out is not None
        serve_agent(sampler, n_gpus, socket_path, port, threads_out, profile_out)
        return
    if sampler is None:
        import torch

        sampler = "gpm" if torch.cuda.is_available() else "fake-gpm"
    if engine_preset and sampler != "gpm":
        raise click.BadParameter("the engine A/B needs the GPU (--sampler gpm)", param_hint="--engine")
    if sampler == "gpm" and n_gpus != 1:
        raise click.BadParameter("--sampler gpm runs its workload on cuda:0 only", param_hint="--gpus")
    port = port or free_port()
    sock_path = f"/tmp/phaselens-bench-{os.getpid()}.sock"
    tmp = tempfile.mkdtemp(prefix="agent-overhead-")
    prof_path = os.path.join(tmp, "agent.prof") if profile else None
    names_path = os.path.join(tmp, "threads.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--as-agent", "--sampler", sampler, "--gpus",
           str(n_gpus), "--socket-path", sock_path, "--port", str(port), "--threads-out", names_path] + \
        (["--profile-out", prof_path] if prof_path else [])
    agent = subprocess.Popen(cmd, env=env)
    base = f"http://127.0.0.1:{port}"
    device_name = platform.processor() or platform.machine()
    ab_text, ab = "", {}  # type: tuple[str, dict[str, Any]]
    try:
        wait_for(base + "/health", 60, agent)
        if sampler == "gpm":
            import torch

            from phaselens.serving_shim.device import gpu_uuid_for

            dev = torch.device("cuda:0")
            uuid, device_name = gpu_uuid_for(dev), torch.cuda.get_device_name(0)
            sender = StepSender(sock_path, [uuid])
            run_for = gpu_steps(sender, dev)
        else:
            prefix = FAKE_UUID_PREFIX if sampler == "fake-gpm" else "GPU-sim-"
            sender = StepSender(sock_path, [f"{prefix}{i}" for i in range(n_gpus)])
            uuid = sender.uuids[0]
            run_for = paced_steps(sender, steps_per_s)
        run_for(warmup_s)
        agent.send_signal(signal.SIGUSR1)  # names its threads; starts the profile if asked
        steps0 = sender.n
        c0, w0, t0 = cpu_seconds(agent.pid), time.monotonic(), thread_cpu(agent.pid)
        run_for(seconds)
        c1, w1, t1 = cpu_seconds(agent.pid), time.monotonic(), thread_cpu(agent.pid)
        measured_steps = sender.n - steps0
        if engine_preset:
            import torch

            del run_for  # the workload's tensors go with it
            torch.cuda.empty_cache()
            c2, w2 = cpu_seconds(agent.pid), time.monotonic()
            ab_text, ab = engine_ab(engine_preset, sock_path, rounds, n_requests)
            c3, w3 = cpu_seconds(agent.pid), time.monotonic()
            ab["agent_cpu_percent"] = 100 * (c3 - c2) / (w3 - w2)
            ab_text += f"\nagent CPU during the engine A/B: {ab['agent_cpu_percent']:.2f}% of one core " \
                       f"({w3 - w2:.0f} s)"
            print(ab_text, flush=True)
        metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        try:
            health = json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
        except urllib.error.HTTPError as exc:
            health = json.loads(exc.read())
    finally:
        agent.terminate()
        agent.wait(30)
    gpus = max(1, len(health.get("gpus", [])))
    share = (c1 - c0) / (w1 - w0) / gpus
    lines = [ln for ln in metrics.splitlines() if ln.startswith("phaselens_phase_utilization_ratio{")
             and f'gpu_uuid="{uuid}"' in ln]
    tensor = {ln.split('phase="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
              for ln in sorted(lines) if 'metric="tensor_active"' in ln}
    rate = measured_steps / (w1 - w0)
    text = (f"agent CPU ({sampler}): {c1 - c0:.2f} s over {w1 - w0:.1f} s wall, {gpus} GPU(s): "
            f"{100 * share:.2f}% of one core per GPU (target < 2%) at {rate:.1f} steps/s per GPU\n"
            f"records sent {sender.sent}, dropped {sender.dropped}, parked {sender.parked} times "
            f"(queue full); agent health {health.get('status')}; "
            f"shim received {health.get('shim_received')} rejected {health.get('shim_rejected')}\n"
            f"published per-phase series for {uuid}: {len(lines)}; tensor_active by phase: "
            + ", ".join(f"{p}={v:.3f}" for p, v in tensor.items()))
    if ab_text:
        text += "\n" + ab_text
    try:
        names = {int(k): v for k, v in json.loads(Path(names_path).read_text()).items()}
    except (OSError, ValueError):
        names = {}
    by_thread: dict[str, float] = {}
    for tid, ns in t1.items():
        name = names.get(tid, "native (BLAS pool, ...)")
        by_thread[name] = by_thread.get(name, 0.0) + 100 * (ns - t0.get(tid, 0)) / 1e9 / (w1 - w0)
    text += "\nby thread (% of one core): " + ", ".join(
        f"{k} {v:.2f}" for k, v in sorted(by_thread.items(), key=lambda kv: -kv[1]))
    text += "\nsamplers' last poll (/health): " + ", ".join(
        f"{k} {1e6 * v['duration_s']:.0f} us" for k, v in sorted(health.get("samplers", {}).items()))
    try:  # written when the agent stopped: the measured window plus the few seconds after it
        nvml_calls = json.loads(Path(names_path).with_name("nvml.json").read_text())
    except (OSError, ValueError):
        nvml_calls = {}
    if nvml_calls:
        span = max(time.monotonic() - w0, 1e-9)
        text += "\nNVML calls (measured window to the agent's stop; per call CPU/wall): " + ", ".join(
            f"{k} {n / span:.1f}/s {cpu / n / 1e3:.0f}/{wall / n / 1e3:.0f} us "
            f"= {100 * cpu / 1e9 / span:.2f}%"
            for k, (n, cpu, wall) in sorted(nvml_calls.items(), key=lambda kv: -kv[1][1]))
    print(text)
    top = ""
    if prof_path:
        if os.path.exists(prof_path):
            buf = io.StringIO()
            # blocking waits (the loop's sleep, the receiver's recv) left out: they cost no CPU
            pstats.Stats(prof_path, stream=buf).sort_stats("cumulative").print_stats(
                r"^(?!.*(threading\.py|acquire|socketserver|'poll'|time\.sleep|\(call\))).*", 20)
            top = buf.getvalue()
            print(f"\nagent profile over the measured window (cProfile, loop + receiver threads):\n{top}")
        else:
            print("agent profile: none written (the agent did not stop cleanly?)")
    if json_out is not None:
        doc = {"sampler": sampler, "device": device_name, "host": platform.node(), "seconds": w1 - w0,
               "agent_cpu_s": c1 - c0, "gpus": gpus, "cpu_percent_per_gpu": 100 * share,
               "steps_per_s": rate, "records_sent": sender.sent, "records_dropped": sender.dropped,
               "records_parked": sender.parked,
               "health": health.get("status"), "shim_received": health.get("shim_received"),
               "shim_rejected": health.get("shim_rejected"), "tensor_active_by_phase": tensor,
               "published_series": len(lines), "cpu_percent_by_thread": by_thread,
               "nvml_calls_count_cpu_ns_wall_ns": nvml_calls, "engine_ab": ab or None,
               "profile_top20": top or None,
               "argv": sys.argv[1:]}
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=1) + "\n")
    if trace_out is not None:
        subprocess.run([sys.executable, "-m", "phaselens", "record", str(trace_out), "--source",
                        "simulated" if sampler == "simulated" else "gpm", "--duration-s", "10",
                        "--socket-path", sock_path + ".rec"], env=env, check=True)
    if results:
        from phaselens.agent.daemon import AgentConfig

        d = AgentConfig()
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as fh:
            fh.write(f"\n## agent overhead ({stamp}, {device_name}, {platform.node()})\n\n"
                     f"`python3 bench/agent_overhead.py {' '.join(sys.argv[1:])}` "
                     f"(defaults: GPM polls locked to its refresh cadence, "
                     f"NVML {d.nvml_interval_ms / 1e3:g} s, "
                     f"attribution every {d.attribute_interval_s:g} s over {d.horizon_s:g} s)"
                     f"\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
