"""A stand-in agent for the exporter integration tests: AgentCollector served over a state from a trace.

Used until ``phaselens agent --source replay|simulated`` can be started by the tests (the agent is built
by its own engineer). It writes a small synthetic trace with :class:`TraceWriter` (seeded: prefill steps
with high tensor activity, decode steps with high DRAM activity, one malformed line), reads it back with
:func:`read_trace` (the malformed line becomes a counted rejection), then replays the steps in a loop at
wall-clock pace into an :class:`AgentState` and publishes a *naive* per-phase attribution (each sample
tagged with the phase running at its timestamp: the baseline method of DESIGN.md, enough to feed the
exporter; the real attribution is the agent's). Everything it exports is labelled ``role="colocated"``
and sampler ``replay``.

Run: ``python -m tests.exporters.agent_harness --port 9400 [--trace out.jsonl]``; it prints
``READY <port>`` once the first attribution is published and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from prometheus_client import start_http_server

from phaselens.agent.state import AgentState, GpuAttribution, GpuIdentity, PhaseValues, SamplerHealth
from phaselens.exporters.prometheus import agent_registry
from phaselens.gpus import gpu_spec
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import GpuInfo, MetaRecord, SampleRecord, StepRecord, Trace, TraceWriter, read_trace

H100 = "NVIDIA H100 80GB HBM3"
GPUS = (("GPU-harness-0", 0), ("GPU-harness-1", 1))
# activity while each phase runs (what a real H100 shows: DESIGN.md's introduction)
LEVELS = {Phase.PREFILL: {"sm_active": 0.96, "tensor_active": 0.92, "dram_active": 0.28},
          Phase.DECODE: {"sm_active": 0.55, "tensor_active": 0.18, "dram_active": 0.86},
          Phase.IDLE: {"sm_active": 0.0, "tensor_active": 0.0, "dram_active": 0.0}}


#: one cycle of steps: (phase, duration ms, prefill tokens, decode tokens)
CYCLE = [(Phase.PREFILL, 150, 2048, 0)] + [(Phase.DECODE, 20, 0, 32)] * 10


def write_trace(path: Path, seconds: float = 10.0, seed: int = 0) -> None:
    """A small trace: per GPU, one 150 ms prefill then ten 20 ms decodes, repeated; samples every 100 ms
    with the activity of the phase running then, plus noise; and one malformed line at the end."""
    rng = random.Random(seed)
    t_start = 1_000_000_000
    steps: list[StepRecord] = []
    samples: list[SampleRecord] = []
    for uuid, _ in GPUS:
        t, n, mine = t_start, 0, []
        while t < t_start + seconds * 1e9:
            for phase, dur_ms, prefill, decode in CYCLE:
                dur = int(dur_ms * 1e6 * rng.uniform(0.9, 1.1))
                mine.append(StepRecord(uuid, "e0", Role.COLOCATED, phase, n, t, t + dur, Clock.GPU, prefill,
                                       decode, max(1, decode), 2048 + 32 * n, 3.3e13 if prefill else 4.0e11,
                                       1.7e10 if prefill else 1.6e10))
                t += dur + 2_000_000  # 2 ms host gap between steps
                n += 1
        steps += mine
        # GPM-like counter samples: each holds the activity over the 100 ms window it closes, i.e. the
        # phase levels weighted by the phases' overlap with that window (plus noise).
        for k in range(1, int(seconds * 10)):
            w0, w1 = t_start + (k - 1) * 100_000_000, t_start + k * 100_000_000
            share = _overlap(mine, w0, w1)
            values: dict[str, float | None] = {}
            for key in LEVELS[Phase.PREFILL]:
                level = sum(f * LEVELS[p][key] for p, f in share.items())
                values[key] = min(1.0, max(0.0, level + rng.gauss(0, 0.01)))
            samples.append(SampleRecord(uuid, "gpm", w1, values))
            if k % 10 == 0:  # NVML once a second
                busy = 1.0 - share.get(Phase.IDLE, 0.0)
                samples.append(SampleRecord(uuid, "nvml", w1, {
                    "gpu_util": 1.0 if busy > 0 else 0.0, "power_w": 400.0 + 200.0 * busy,
                    "sm_clock_hz": 1.98e9, "mem_used_bytes": 6.0e10}))
    spec = gpu_spec(H100)
    with TraceWriter(path) as w:
        w.write(MetaRecord(host="harness", gpus=tuple(GpuInfo(u, i, H100, spec.peak_bf16_flops,
                                                              spec.peak_dram_bytes_per_s) for u, i in GPUS)))
        for rec in sorted([*steps, *samples], key=lambda r: r.t0_ns if isinstance(r, StepRecord) else r.t_ns):
            w.write(rec)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"type":"step","gpu_uuid":"GPU-harness-0","phase":"prefil"}\n')  # malformed on purpose


def _overlap(steps: list[StepRecord], t0: int, t1: int) -> dict[Phase, float]:
    """Fraction of [t0, t1) each phase ran (idle: the rest)."""
    out: dict[Phase, float] = defaultdict(float)
    for s in steps:
        lo, hi = max(s.t0_ns, t0), min(s.t1_ns, t1)
        if hi > lo:
            out[s.phase] += (hi - lo) / (t1 - t0)
    out[Phase.IDLE] = max(0.0, 1.0 - sum(out.values()))
    return out


def _phase_at(steps: list[StepRecord], t_ns: int) -> Phase:
    for s in steps:
        if s.t0_ns <= t_ns < s.t1_ns:
            return s.phase
    return Phase.IDLE


def naive_attribution(trace: Trace, uuid: str, identity: GpuIdentity) -> GpuAttribution:
    steps = [s for s in trace.steps if s.gpu_uuid == uuid]
    samples = [s for s in trace.samples if s.gpu_uuid == uuid]
    span_s = (max(s.t1_ns for s in steps) - min(s.t0_ns for s in steps)) / 1e9
    busy: dict[Phase, float] = defaultdict(float)
    flops: dict[Phase, float] = defaultdict(float)
    nbytes: dict[Phase, float] = defaultdict(float)
    for s in steps:
        busy[s.phase] += s.duration_s
        flops[s.phase] += s.flops
        nbytes[s.phase] += s.bytes
    tagged: dict[Phase, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    blended: dict[str, list[float]] = defaultdict(list)
    for smp in samples:
        phase = _phase_at(steps, smp.t_ns)
        for k, v in smp.values.items():
            if v is not None and (k in LEVELS[Phase.PREFILL] or k == "gpu_util"):
                tagged[phase][k].append(v)
                blended[k].append(v)
    spec = gpu_spec(H100)
    phases = {}
    for phase in (Phase.PREFILL, Phase.DECODE):
        vals = {k: sum(v) / len(v) for k, v in tagged[phase].items() if v}
        unc = {k: (sum((x - vals[k]) ** 2 for x in v) / max(1, len(v) - 1)) ** 0.5 / len(v) ** 0.5
               for k, v in tagged[phase].items() if len(v) > 1}
        phases[phase] = PhaseValues(busy[phase] / span_s, vals, unc,
                                    mfu=flops[phase] / busy[phase] / spec.peak_bf16_flops,
                                    mbu=nbytes[phase] / busy[phase] / spec.peak_dram_bytes_per_s)
    share = {p: busy[p] / span_s for p in (Phase.PREFILL, Phase.DECODE, Phase.MIXED)}
    share[Phase.IDLE] = max(0.0, 1.0 - sum(share.values()))
    return GpuAttribution(gpu=identity, phases=phases, time_share=share,
                          blended={k: sum(v) / len(v) for k, v in blended.items()}, alignment_offset_s=0.0,
                          windows=len(samples), method="naive", updated_ns=time.time_ns())


class HarnessAgent:
    """Replays a trace into an AgentState at wall-clock pace and re-publishes the attribution."""

    def __init__(self, trace_path: Path, model_name: str = "tiny", hostname: str = "harness-node"):
        self.trace = read_trace(trace_path)
        self.state = AgentState(hostname)
        self.model_name = model_name
        self.stop = threading.Event()
        self.ids = [GpuIdentity(g.uuid, g.index, g.name, model_name=model_name, role="colocated")
                    for g in (self.trace.meta.gpus if self.trace.meta else ())]
        if self.trace.malformed:
            self.state.count_rejected("malformed", self.trace.malformed)

    def publish(self) -> None:
        for ident in self.ids:
            self.state.publish_attribution(naive_attribution(self.trace, ident.uuid, ident))

    def run(self, ready: threading.Event) -> None:
        self.state.set_gpus(self.ids)
        self.publish()
        self.state.sampler_result(SamplerHealth("replay", True, 0.0001))
        self.state.mark_started()
        ready.set()
        steps = sorted(self.trace.steps, key=lambda s: s.t0_ns)
        samples = sorted(self.trace.samples, key=lambda s: s.t_ns)
        origin = steps[0].t0_ns
        period = steps[-1].t1_ns - origin
        wall0 = time.monotonic_ns()
        i = j = 0
        lap = 0
        while not self.stop.is_set():
            now = time.monotonic_ns() - wall0 - lap * period
            while i < len(steps) and steps[i].t1_ns - origin <= now:
                self.state.observe_step(steps[i])
                self.state.count_received()
                i += 1
            while j < len(samples) and samples[j].t_ns - origin <= now:
                t0 = time.perf_counter()
                self.state.update_raw(samples[j].gpu_uuid, samples[j].values)
                self.state.sampler_result(SamplerHealth("replay", True, time.perf_counter() - t0))
                j += 1
            if i == len(steps) and j == len(samples):
                i = j = 0
                lap += 1
                self.publish()
            self.stop.wait(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--model-name", default="tiny")
    parser.add_argument("--write-only", type=float, default=None, metavar="SECONDS",
                        help="Write a trace this long to --trace and exit (for `agent --source replay`).")
    args = parser.parse_args(argv)
    trace = args.trace or Path(tempfile.mkdtemp(prefix="phaselens-harness-")) / "trace.jsonl"
    if args.write_only is not None:
        write_trace(trace, seconds=args.write_only)
        return 0
    if not trace.exists():
        write_trace(trace)
    agent = HarnessAgent(trace, args.model_name)
    server, thread = start_http_server(args.port, addr="127.0.0.1", registry=agent_registry(agent.state))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    ready = threading.Event()
    worker = threading.Thread(target=agent.run, args=(ready,), daemon=True)
    worker.start()
    ready.wait(30)
    print(f"READY {server.server_address[1]}", flush=True)
    while worker.is_alive() and not agent.stop.is_set():
        agent.stop.wait(0.5)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
