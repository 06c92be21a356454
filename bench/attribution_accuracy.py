"""Ground-truth benchmark of per-phase attribution (issue 12): naive vs unmix against measured truth.

On the GPU machine, ``record`` runs a phase-controlled workload on one GPU while a separate process polls
NVML GPM every 10 ms (and NVML every 100 ms):

- ``prefill`` steps: compute-bound bf16 matmul bursts (8192^3),
- ``decode`` steps: memory-bound skinny bf16 matmuls (batch 16 against a ~1 GB weight), decode-shaped,
- ``mixed`` steps: both interleaved, as a chunked-prefill step that carries decodes.

Each step's GPU interval comes from CUDA events read after the fact and mapped to wall clock through a
reference event (DESIGN.md "Phases and clocks"). Regimes: burst lengths 150-600 ms, 40-150 ms, 10-40 ms,
and an 8B-shaped regime (~45 ms prefill chunks, ~10 ms decode steps, ~20 ms mixed steps, random idle
gaps). Long pure runs of each phase (at the start and at the end) give the true per-phase values: the mean
of the GPM windows that lie wholly inside a pure run. Duty-cycled runs (the 8B step lengths with idle gaps)
beside them give a second, diagnostic truth: how far a phase's signature moves with its context (clock under
the power cap, steps after idle).

The 8B regime also carries its own, in-context truth: about 13% of its time goes to long (350-600 ms) runs
of one phase's steps, so that whole GPM windows fall inside one run whatever their delay
(``context_windows``). Those windows' means are the truth of each phase in that mix, and they are held out
of the regime's trace, so the estimate graded against them never sees them.

``evaluate`` (CPU) turns the recordings into trace files, attributes each regime with ``naive`` and
``unmix`` (phaselens.agent.attribution) and reports, per regime, the largest absolute error over
{sm_active, tensor_active, dram_active} x {prefill, decode, mixed}; ``--results-md`` appends the table to
bench/RESULTS.md, ``--fixtures`` writes the small CPU-test fixtures (merged into those there: a recording of
some regimes replaces only their fixtures). ``probe-kernels`` prints the power, clock and GPM activity of each
candidate prefill kernel.

    python3 bench/attribution_accuracy.py record --out $OUT/raw                 # GPU machine, ~5 min
    python3 bench/attribution_accuracy.py record --out $OUT/raw --regimes 8b    # truth runs + 8B, ~2.5 min
    python3 bench/attribution_accuracy.py evaluate --raw DIR [--fixtures tests/fixtures/attribution]
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from multiprocessing.synchronize import Event as MpEvent
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
import multiprocessing as mp
import random
import socket
import sys
import time
from pathlib import Path

import click
import numpy as np

if TYPE_CHECKING:
    from phaselens.agent.attribution import _Timeline

GPM_METRICS = ("sm_active", "sm_occupancy", "tensor_active", "dram_active", "fp16_active")
GPM_IDS = {"sm_active": 2, "sm_occupancy": 3, "tensor_active": 5, "dram_active": 10, "fp16_active": 13}

#: name -> (min_ms, max_ms) of step lengths; "8b" is drawn per phase below.
REGIMES = {"long": (150.0, 600.0), "medium": (40.0, 150.0), "short": (10.0, 40.0), "8b": (0.0, 0.0)}
PHASES = ("prefill", "decode", "mixed")
#: "prefill" kernels: (m, k, n, batch) of a bf16 matmul. mm8192 draws the H100 to its 700 W cap (its clock
#: drops to ~1.4 GHz in long runs, ~1.8 GHz between decode steps: the signature itself moves with the clock);
#: the smaller ones are prefill-chunk shaped (a 2048-token chunk through an 8B MLP up-projection, ...).
PREFILL_KERNELS = {
    "mm8192": (8192, 8192, 8192, 1),
    "mm4096": (4096, 4096, 4096, 1),
    "chunk2048": (2048, 4096, 14336, 1),
    "chunk1024": (1024, 8192, 8192, 1),
    "bmm16x1024": (1024, 1024, 1024, 16),
}
#: step lengths of the 8B-shaped regime, and the duty cycles of the truth runs beside the pure ones
STEP_8B_MS = {"prefill": 45.0, "decode": 10.0, "mixed": 20.0}
DUTIES = (0.5, 0.25)
#: the 8B regime's in-context truth. A GPM window (~100 ms) ends 0-110 ms before the poll that sees it (a
#: drifting sawtooth, bench/RESULTS.md), so a window is surely inside one run only if the run covers
#: [poll - period - 110 ms, poll]: ~210 ms. Long runs of 350-600 ms leave ~1.4-3.9 such polls each; one comes
#: every 2-4.5 s of regular 8B steps (mean 3.25 s: ~13% of the time in long runs, ~10 truth windows per
#: phase in 45 s). Short enough to stay 8B-shaped, long enough that whole windows fall inside.
CONTEXT_RUN_MS = (350.0, 600.0)
CONTEXT_EVERY_S = (2.0, 4.5)
CONTEXT_DELAY_MAX_MS = 110.0
#: the share of a window's coverage that must be its phase: steps of one run abut within ~16 us (H100
#: recording), so this only lets those slivers through, never an idle gap or another phase's step
CONTEXT_PURITY = 0.999
#: the regimes that get an in-context truth
CONTEXT_REGIMES = ("8b",)


# ------------------------------------------------------------------ the poller (its own process: no GIL)


def _poller(stop: MpEvent, ready: MpEvent, path: str, gpu_index: int, poll_ms: float) -> None:
    import pynvml as nv

    nv.nvmlInit()
    handle = nv.nvmlDeviceGetHandleByIndex(gpu_index)
    support = nv.nvmlGpmQueryDeviceSupport(handle)
    with open(path, "w") as fh:
        fh.write(json.dumps({"k": "info", "gpm_supported": int(support.isSupportedDevice),
                             "uuid": nv.nvmlDeviceGetUUID(handle), "name": nv.nvmlDeviceGetName(handle),
                             "poll_ms": poll_ms}) + "\n")
        samples = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
        nv.nvmlGpmSampleGet(handle, samples[0])
        cur = 0
        next_t = time.monotonic()
        next_nvml = next_t
        last_util_ts = 0
        next_util = next_t + 1.0
        ready.set()
        while not stop.is_set():
            next_t += poll_ms / 1000.0
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()
            t0 = time.time_ns()
            nxt = 1 - cur
            nv.nvmlGpmSampleGet(handle, samples[nxt])
            t1 = time.time_ns()
            mg = nv.c_nvmlGpmMetricsGet_t()
            mg.version = nv.NVML_GPM_METRICS_GET_VERSION
            mg.numMetrics = len(GPM_METRICS)
            mg.sample1 = samples[cur]
            mg.sample2 = samples[nxt]
            for i, key in enumerate(GPM_METRICS):
                mg.metrics[i].metricId = GPM_IDS[key]
            err = ""
            try:
                nv.nvmlGpmMetricsGet(mg)
            except nv.NVMLError as exc:
                err = str(exc)
            vals = [mg.metrics[i].value for i in range(len(GPM_METRICS))]
            rets = [int(mg.metrics[i].nvmlReturn) for i in range(len(GPM_METRICS))]
            fh.write(json.dumps({"k": "gpm", "t0": t0, "t1": t1, "v": vals, "r": rets, "e": err}) + "\n")
            cur = nxt
            now = time.monotonic()
            if now >= next_nvml:
                next_nvml += 0.1
                t = time.time_ns()
                rec: dict[str, object] = {"k": "nvml", "t": t}
                try:
                    u = nv.nvmlDeviceGetUtilizationRates(handle)
                    rec["gpu_util"] = u.gpu / 100.0
                    rec["mem_util"] = u.memory / 100.0
                    rec["power_w"] = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
                    rec["sm_clock_hz"] = nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM) * 1e6
                    rec["mem_used_bytes"] = nv.nvmlDeviceGetMemoryInfo(handle).used
                except nv.NVMLError as exc:
                    rec["e"] = str(exc)
                fh.write(json.dumps(rec) + "\n")
            if now >= next_util:
                next_util += 1.0
                try:
                    _, buf = nv.nvmlDeviceGetSamples(handle, nv.NVML_GPU_UTILIZATION_SAMPLES, last_util_ts)
                    pts = [[s.timeStamp, s.sampleValue.uiVal] for s in buf]
                    if pts:
                        last_util_ts = max(p[0] for p in pts)
                    fh.write(json.dumps({"k": "util_samples", "t": time.time_ns(), "s": pts}) + "\n")
                except nv.NVMLError as exc:
                    fh.write(json.dumps({"k": "util_samples", "e": str(exc)}) + "\n")
    nv.nvmlShutdown()


# ------------------------------------------------------------------ the workload


def _kernel_counts(phase: str, ms: float, cal: dict[str, float]) -> tuple[int, int]:
    if phase == "prefill":
        return max(1, round(ms / cal["big"])), 0
    if phase == "decode":
        return 0, max(1, round(ms / cal["skinny"]))
    pairs = max(1, round(ms / (cal["big"] + 3 * cal["skinny"])))
    return pairs, 3 * pairs


class Workload:
    """Phase-controlled GPU bursts with CUDA-event intervals mapped to wall clock."""

    def __init__(self, device: str = "cuda:0", seed: int = 0, prefill_kernel: str = "mm8192"):
        import torch

        self.torch = torch
        self.dev = torch.device(device)
        g = torch.Generator(device=self.dev).manual_seed(seed)
        self.prefill_kernel = prefill_kernel
        m, k, n, batch = PREFILL_KERNELS[prefill_kernel]
        self.a = torch.randn(batch, m, k, device=self.dev, dtype=torch.bfloat16, generator=g).squeeze(0)
        self.b = torch.randn(batch, k, n, device=self.dev, dtype=torch.bfloat16, generator=g).squeeze(0)
        self.c = torch.empty(batch, m, n, device=self.dev, dtype=torch.bfloat16).squeeze(0)
        self.big_flops = 2.0 * m * k * n * batch
        self.big_bytes = 2.0 * batch * (m * k + k * n + m * n)
        # decode-shaped: batch-16 activations against a 8192 x 57344 bf16 weight (0.94 GB, far beyond L2)
        self.w = torch.randn(57344, 8192, device=self.dev, dtype=torch.bfloat16, generator=g)
        self.x = torch.randn(16, 8192, device=self.dev, dtype=torch.bfloat16, generator=g)
        self.y = torch.empty(16, 57344, device=self.dev, dtype=torch.bfloat16)
        self.ms = {"big": 1.0, "skinny": 1.0}
        self.ref: Any = None  # a torch.cuda.Event once set_reference ran
        self.ref_ns = 0

    def big(self) -> None:
        self.torch.matmul(self.a, self.b, out=self.c)

    def skinny(self) -> None:
        self.torch.matmul(self.x, self.w.t(), out=self.y)

    def calibrate(self) -> dict[str, float]:
        torch = self.torch
        for name, fn in (("big", self.big), ("skinny", self.skinny)):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(50):
                fn()
            e.record()
            e.synchronize()
            self.ms[name] = s.elapsed_time(e) / 50
        return dict(self.ms)

    def set_reference(self) -> None:
        torch = self.torch
        torch.cuda.synchronize()
        self.ref = torch.cuda.Event(enable_timing=True)
        t0 = time.time_ns()
        self.ref.record()
        self.ref.synchronize()
        t1 = time.time_ns()
        self.ref_ns = (t0 + t1) // 2

    def wall_ns(self, ev) -> int:
        return self.ref_ns + int(round(self.ref.elapsed_time(ev) * 1e6))

    def launch(self, phase: str, ms: float) -> tuple[int, int]:
        """Enqueue one step of ``phase`` lasting about ``ms``; returns (big matmuls, skinny matmuls)."""
        n_big, n_skinny = _kernel_counts(phase, ms, self.ms)
        if phase == "mixed":  # a chunk of prefill matmuls carrying decode GEMVs, ~60/40 by time
            for _ in range(n_big):
                self.big()
                for _ in range(3):
                    self.skinny()
            return n_big, n_skinny
        for _ in range(n_big):
            self.big()
        for _ in range(n_skinny):
            self.skinny()
        return n_big, n_skinny

    def run_steps(self, plan: list[tuple[str, float, float]], label: str) -> list[dict]:
        """plan: (phase, step_ms, idle_gap_ms_before). Returns step dicts with wall-clock ns."""
        torch = self.torch
        pending: list[tuple[str, Any, Any, float, tuple[int, int]]] = []  # (phase, start, end event, ...)
        for phase, ms, gap_ms in plan:
            if gap_ms > 0:
                if pending:
                    pending[-1][2].synchronize()
                time.sleep(gap_ms / 1000.0)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            counts = self.launch(phase, ms)
            e.record()
            pending.append((phase, s, e, ms, counts))
            if len(pending) >= 4:
                pending[-4][2].synchronize()  # keep the host at most a few steps ahead
        torch.cuda.synchronize()
        return [{"regime": label, "phase": p, "t0_ns": self.wall_ns(s), "t1_ns": self.wall_ns(e),
                 "target_ms": ms, "big": c[0], "skinny": c[1]} for p, s, e, ms, c in pending]


def make_plan(regime: str, seconds: float, rng: random.Random) -> list[tuple[str, float, float]]:
    """Steps (phase, step_ms, idle_gap_ms_before) of about ``seconds`` of ``regime``, drawn from ``rng``.

    The "8b" regime is engine-like (runs of decode steps broken by prefill chunks or mixed steps, random
    idle gaps), and now and then (``CONTEXT_EVERY_S`` apart, ~13% of the time) one long single-phase run
    (``CONTEXT_RUN_MS``) of the same step lengths: whole GPM windows fall inside it, for the in-context
    truth (``context_windows``). The phases of the long runs take turns in shuffled rounds, so each gets a
    share of the truth windows whatever the seed."""
    plan: list[tuple[str, float, float]] = []
    total = 0.0
    if regime == "8b":

        def step_ms(kind: str) -> float:
            return (rng.uniform(8.0, 12.0) if kind == "decode"
                    else rng.uniform(40.0, 50.0) if kind == "prefill" else rng.uniform(17.0, 23.0))

        turns: list[str] = []
        next_long = rng.uniform(*CONTEXT_EVERY_S) * 1000
        while total < seconds * 1000:
            if total >= next_long:
                if not turns:
                    turns = list(PHASES)
                    rng.shuffle(turns)
                kind = turns.pop()
                # an idle gap may come before a long run, never inside it (that would split it)
                gap = rng.uniform(5.0, 150.0) if rng.random() < 0.05 else 0.0
                total += gap
                run, target = 0.0, rng.uniform(*CONTEXT_RUN_MS)
                while run < target:
                    ms = step_ms(kind)
                    plan.append((kind, ms, gap if run == 0.0 else 0.0))
                    run += ms
                total += run
                next_long = total + rng.uniform(*CONTEXT_EVERY_S) * 1000
                continue
            # engine-like: runs of decode steps, broken by a prefill chunk or a mixed step; random idle gaps
            for _ in range(rng.randint(2, 25)):
                ms = step_ms("decode")
                gap = rng.uniform(5.0, 150.0) if rng.random() < 0.04 else 0.0
                plan.append(("decode", ms, gap))
                total += ms + gap
            kind = rng.choice(("prefill", "mixed", "mixed"))
            for _ in range(rng.randint(1, 4)):
                ms = step_ms(kind)
                gap = rng.uniform(5.0, 150.0) if rng.random() < 0.05 else 0.0
                plan.append((kind, ms, gap))
                total += ms + gap
        return plan
    lo, hi = REGIMES[regime]
    while total < seconds * 1000:
        ms = rng.uniform(lo, hi)
        gap = rng.uniform(lo / 2, hi) if rng.random() < 0.12 else 0.0
        plan.append((rng.choice(PHASES), ms, gap))
        total += ms + gap
    return plan


def record(out: Path, regime_s: float, pure_s: float, poll_ms: float, seed: int,
           prefill_kernel: str = "mm8192", regimes: tuple[str, ...] = tuple(REGIMES)) -> None:
    """Truth runs, the selected ``regimes`` (in REGIMES order), truth runs again; raw files in ``out``."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_poller, args=(stop, ready, str(out / "raw_poll.jsonl"), 0, poll_ms),
                       daemon=True)
    proc.start()
    wl = Workload(prefill_kernel=prefill_kernel)
    cal = wl.calibrate()
    print(f"calibration: {prefill_kernel} {cal['big']:.3f} ms "
          f"({wl.big_flops / cal['big'] / 1e9:.0f} TFLOP/s), "
          f"skinny {cal['skinny']:.3f} ms ({57344 * 8192 * 2 / cal['skinny'] / 1e9:.0f} GB/s)", flush=True)
    if not ready.wait(30):
        raise SystemExit("poller did not start")
    wl.set_reference()
    rng = random.Random(seed)
    steps: list[dict] = []
    spans: list[dict] = []

    def truth_runs(tag: str) -> None:
        """Per phase: a pure run (duty 1) and duty-cycled runs (the 8B regime's step length, idle gaps),
        whose lower power lets the clock rise as it does in the mixed regimes (see ``duty_truth``)."""
        for phase in PHASES:
            t = time.time_ns()
            steps.extend(wl.run_steps([(phase, 100.0, 0.0)] * int(pure_s * 10), f"pure_{tag}"))
            spans.append({"kind": "pure", "phase": phase, "duty": 1.0, "start_ns": t,
                          "end_ns": time.time_ns()})
            for duty in DUTIES:
                length = STEP_8B_MS[phase]
                plan, total = [], 0.0
                while total < pure_s * 1000:
                    gap = rng.expovariate(duty / (length * (1 - duty)))
                    plan.append((phase, length, gap))
                    total += length + gap
                t = time.time_ns()
                steps.extend(wl.run_steps(plan, f"duty_{tag}"))
                spans.append({"kind": "duty", "phase": phase, "duty": duty, "start_ns": t,
                              "end_ns": time.time_ns()})
        t = time.time_ns()
        time.sleep(pure_s / 2)
        spans.append({"kind": "pure", "phase": "idle", "duty": 0.0, "start_ns": t, "end_ns": time.time_ns()})

    truth_runs("a")
    for regime in REGIMES:
        # every plan is drawn, run or not, so a regime's plan for a seed is the same whichever are selected
        plan = make_plan(regime, regime_s, rng)
        if regime not in regimes:
            continue
        time.sleep(0.5)
        t = time.time_ns()
        steps.extend(wl.run_steps(plan, regime))
        spans.append({"kind": "regime", "regime": regime, "start_ns": t, "end_ns": time.time_ns()})
        print(f"regime {regime}: done", flush=True)
    time.sleep(0.5)
    truth_runs("b")
    # the reference again: how far the GPU clock drifted from the host clock over the run
    old_ref, old_ns = wl.ref, wl.ref_ns
    wl.set_reference()
    drift_ns = wl.ref_ns - (old_ns + int(old_ref.elapsed_time(wl.ref) * 1e6))
    stop.set()
    proc.join(10)
    meta = {"host": socket.gethostname(), "gpu": torch.cuda.get_device_name(0), "calibration_ms": cal,
            "clock_drift_ns": drift_ns, "ref1_ns": old_ns, "ref2_ns": wl.ref_ns, "poll_ms": poll_ms,
            "regime_s": regime_s, "pure_s": pure_s, "spans": spans, "prefill_kernel": prefill_kernel,
            "regimes": [r for r in REGIMES if r in regimes], "seed": seed,
            "big_flops": wl.big_flops, "big_bytes": wl.big_bytes}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    with open(out / "steps.jsonl", "w") as fh:
        for s in steps:
            fh.write(json.dumps(s) + "\n")
    print(f"recorded {len(steps)} steps; clock drift over the run {drift_ns / 1e3:.1f} us", flush=True)
    _summarize_raw(out / "raw_poll.jsonl")


def _summarize_raw(path: Path) -> None:
    from collections import Counter

    polls = [json.loads(line) for line in open(path)]
    gpm = [p for p in polls if p["k"] == "gpm"]
    rets = Counter(tuple(p["r"]) for p in gpm)
    errs = Counter(p["e"] for p in gpm)
    zeros = sum(1 for p in gpm if all(v == 0 for v in p["v"]))
    dts = sorted((b["t0"] - a["t0"]) / 1e6 for a, b in zip(gpm, gpm[1:]))
    print(f"gpm polls {len(gpm)}; returns {dict(rets)}; errors {dict(errs)}; all-zero {zeros}; "
          f"poll interval median {dts[len(dts) // 2]:.2f} ms p99 {dts[int(len(dts) * 0.99)]:.2f} ms")
    for p in gpm[300:340]:
        print(p["t0"] % 10**10 // 10**6, [round(v, 2) for v in p["v"]], p["r"], p["e"])


# ------------------------------------------------------------------ raw recordings -> trace files + truth

BIG_FLOPS = 2 * 8192**3
BIG_BYTES = 3 * 8192 * 8192 * 2
SKINNY_FLOPS = 2 * 16 * 8192 * 57344
SKINNY_BYTES = 57344 * 8192 * 2 + 16 * (8192 + 57344) * 2
TRUTH_KEYS = ("sm_active", "tensor_active", "dram_active")


def load_raw(raw: Path) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """(meta, steps with drift-corrected wall-clock ns, gpm polls, nvml polls) of a ``record`` folder."""
    meta = json.loads((raw / "meta.json").read_text())
    ref1 = meta.get("ref1_ns", meta["spans"][0]["start_ns"])
    ref2 = meta.get("ref2_ns", meta["spans"][-1]["end_ns"])
    drift = meta["clock_drift_ns"]

    def corr(t: int) -> int:
        # GPU and host clocks drift apart (~15 ppm on the H100 machine): interpolate between the references
        return int(t + drift * (t - ref1) / (ref2 - ref1))

    steps = [json.loads(line) for line in open(raw / "steps.jsonl")]
    for st in steps:
        st["t0_ns"], st["t1_ns"] = corr(st["t0_ns"]), corr(st["t1_ns"])
        if "big" not in st:  # recordings made before the counts were stored
            st["big"], st["skinny"] = _kernel_counts(st["phase"], st["target_ms"], meta["calibration_ms"])
    gpm, nvml, info = [], [], {}
    for line in open(raw / "raw_poll.jsonl"):
        rec = json.loads(line)
        if rec["k"] == "gpm":
            gpm.append(rec)
        elif rec["k"] == "nvml" and "e" not in rec:
            nvml.append(rec)
        elif rec["k"] == "info":
            info = rec
    meta["info"] = info
    return meta, steps, gpm, nvml


def gpm_values(rec: dict) -> dict[str, float | None]:
    """One poll's values as ratios; all None where the hardware had not refreshed (DRAM reads NaN: 0/0)."""
    vals = rec["v"]
    dram = vals[GPM_METRICS.index("dram_active")]
    if dram is None or (isinstance(dram, float) and math.isnan(dram)) or any(r != 0 for r in rec["r"]):
        return {k: None for k in GPM_METRICS}
    return {k: max(0.0, min(1.0, v / 100.0)) for k, v in zip(GPM_METRICS, vals)}


def truth_from_pure(meta: dict, gpm: list[dict]) -> dict[str, dict[str, float]]:
    """Per phase: mean of the GPM windows seen at least 0.5 s into a pure run and before its end."""
    acc: dict[str, list[dict[str, Any]]] = {}
    for span in meta["spans"]:
        if span["kind"] != "pure":
            continue
        for rec in gpm:
            t = (rec["t0"] + rec["t1"]) // 2
            if span["start_ns"] + 500_000_000 < t < span["end_ns"]:
                v = gpm_values(rec)
                if v["sm_active"] is not None:
                    acc.setdefault(span["phase"], []).append(v)
    return {ph: {k: sum(v[k] for v in rows) / len(rows) for k in GPM_METRICS} for ph, rows in acc.items()}


def _phase_timeline(steps: list[dict], t_ref: int) -> _Timeline:
    """The attributor's own busy-time timeline of raw step dicts (exact window overlaps)."""
    from phaselens.agent.attribution import _Steps, _Timeline
    from phaselens.phase import Phase

    # the fields _Steps.of reads; the step records themselves would need a GPU, an engine, tokens, ...
    recs: list[Any] = [SimpleNamespace(t0_ns=st["t0_ns"], t1_ns=st["t1_ns"], phase=Phase.parse(st["phase"]),
                                       flops=0.0, bytes=0.0) for st in steps]
    # _Timeline.build takes the attributor's column form (_Steps) since f8c7db7, not records
    return _Timeline.build(_Steps.of(recs), t_ref)


def _clock_during(nvml: list[dict], steps: list[dict]) -> float | None:
    """Mean SM clock (MHz) of the NVML polls taken while one of ``steps`` ran."""
    if not steps:
        return None
    t0 = np.array([st["t0_ns"] for st in steps])
    t1 = np.array([st["t1_ns"] for st in steps])
    order = np.argsort(t0)
    t0, t1 = t0[order], t1[order]
    vals = []
    for rec in nvml:
        i = np.searchsorted(t0, rec["t"], side="right") - 1
        if i >= 0 and rec["t"] <= t1[i]:
            vals.append(rec["sm_clock_hz"] / 1e6)
    return float(np.mean(vals)) if vals else None


def truth_points(meta: dict, steps: list[dict], gpm: list[dict], nvml: list[dict]) -> dict[str, list[dict]]:
    """Per phase, one point per truth run: its duty, mean SM clock and per-metric values.

    Pure runs (duty 1): the mean of the windows wholly inside. Duty-cycled runs: single phase plus idle, and
    idle reads 0 on every metric (measured), so ``value = u * f`` per window; the window offset is the one
    that fits best (scanned 0-200 ms, 1 ms) and ``u = sum(value) / sum(f)``."""
    points: dict[str, list[dict]] = {}
    for span in meta["spans"]:
        if span["kind"] not in ("pure", "duty") or span["phase"] == "idle":
            continue
        lo, hi = span["start_ns"] + 500_000_000, span["end_ns"]
        ups = [(rec, gpm_values(rec)) for rec in gpm if lo < (rec["t0"] + rec["t1"]) // 2 < hi]
        ups = [(rec, v) for rec, v in ups if v["sm_active"] is not None]
        mine = [st for st in steps if span["start_ns"] <= st["t0_ns"] < span["end_ns"]]
        if len(ups) < 10 or not mine:
            continue
        Y = np.array([[v[k] for k in GPM_METRICS] for _, v in ups])
        if span["kind"] == "pure":
            values = Y.mean(axis=0)
        else:
            t_ref = mine[0]["t0_ns"]
            tl = _phase_timeline(mine, t_ref)
            t = np.array([((rec["t0"] + rec["t1"]) // 2 - t_ref) / 1e9 for rec, _ in ups])
            best = None
            for off in np.arange(0.0, 0.2, 0.001):
                f = tl.fractions(t - off - 0.1, t - off)[:, :3].sum(axis=1)
                # the ratio of sums, not the slope through the origin: errors in f would bias a slope down
                u = Y.sum(axis=0) / max(float(f.sum()), 1e-9)
                r = float(np.mean((Y[:, 0] - u[0] * f) ** 2))
                if best is None or r < best[0]:
                    best = (r, u)
            assert best is not None  # the scan has 200 offsets
            values = best[1]
        points.setdefault(span["phase"], []).append({
            "duty": span.get("duty", 1.0), "clock_mhz": _clock_during(nvml, mine),
            "values": {k: float(v) for k, v in zip(GPM_METRICS, values)}})
    return points


def duty_truth(points: dict[str, list[dict]], duty: float = 0.5) -> dict[str, dict[str, float]]:
    """Per phase: the mean of the duty-cycled truth runs at ``duty`` (the 8B regime's step length with idle
    between): a second reference, for how much a phase's own signature moves with its context."""
    out = {}
    for phase, pts in points.items():
        mine = [p for p in pts if abs(p["duty"] - duty) < 1e-9]
        if mine:
            out[phase] = {k: float(np.mean([p["values"][k] for p in mine])) for k in GPM_METRICS}
            out[phase]["clock_mhz"] = float(np.mean([p["clock_mhz"] or 0.0 for p in mine]))
    return out


def context_windows(steps: list[dict], gpm: list[dict], t_lo: int, t_hi: int,
                    delay_max_ms: float = CONTEXT_DELAY_MAX_MS) -> dict[str, list[tuple[int, dict]]]:
    """Per phase: the GPM refreshes polled in [t_lo, t_hi) whose window lies inside one run of that phase of
    ``steps`` for every window delay from 0 to ``delay_max_ms``: (poll t_ns, values), in poll order.

    The delay is a drifting sawtooth, not known per window without the fit we grade, so the whole span
    [poll - period - delay_max, poll] must be the phase (``CONTEXT_PURITY`` of it: the slivers between
    abutting steps). ``period`` is the larger of the median refresh interval and this refresh's own gap to the
    one before: a refresh that came late covers a longer window. Idle is never a phase here, so a gap splits
    a run.
    """
    from phaselens.phase import Phase

    ups = sorted(((rec["t0"] + rec["t1"]) // 2, gpm_values(rec)) for rec in gpm
                 if t_lo <= (rec["t0"] + rec["t1"]) // 2 < t_hi)
    ups = [(t, v) for t, v in ups if v["sm_active"] is not None]
    out: dict[str, list[tuple[int, dict]]] = {ph: [] for ph in PHASES}
    if len(ups) < 2 or not steps:
        return out
    t = np.array([u[0] for u in ups], dtype=np.int64)
    gaps = np.diff(t).astype(float)
    median = float(np.median(gaps))
    period = np.maximum(np.concatenate([[median], gaps]), median)
    t_ref = int(t[0])
    end = (t - t_ref) / 1e9
    start = end - (period + delay_max_ms * 1e6) / 1e9
    f = _phase_timeline(steps, t_ref).fractions(start, end)[:, :3]
    busy = [p.value for p in Phase.busy()]  # the timeline's column order
    for i in np.flatnonzero(f.max(axis=1) >= CONTEXT_PURITY):
        out[busy[int(np.argmax(f[i]))]].append((int(t[i]), ups[i][1]))
    return out


def context_truth(windows: dict[str, list[tuple[int, dict]]], nvml: list[dict],
                  delay_max_ms: float = CONTEXT_DELAY_MAX_MS) -> tuple[dict, dict, dict, dict]:
    """(truth, windows, stderr, clock_mhz) per phase of ``context_windows``: the mean of each metric over the
    windows, their count, the standard error of the mean, and the mean SM clock of the NVML polls taken in
    the windows' spans (phases without windows have a count of 0 and nothing else)."""
    truth: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    clock: dict[str, float | None] = {}
    for phase, rows in windows.items():
        if not rows:
            continue
        Y = np.array([[v[k] for k in GPM_METRICS] for _, v in rows])
        truth[phase] = {k: float(x) for k, x in zip(GPM_METRICS, Y.mean(axis=0))}
        se = (Y.std(axis=0, ddof=1) / math.sqrt(len(rows)) if len(rows) > 1
              else np.full(len(GPM_METRICS), np.nan))
        stderr[phase] = {k: float(x) for k, x in zip(GPM_METRICS, se) if np.isfinite(x)}
        # the spans the windows may have covered (median period ~100 ms plus the delay range)
        spans = [(t - int((100.0 + delay_max_ms) * 1e6), t) for t, _ in rows]
        mhz = [rec["sm_clock_hz"] / 1e6 for rec in nvml if any(a <= rec["t"] <= b for a, b in spans)]
        clock[phase] = float(np.mean(mhz)) if mhz else None
    return truth, {ph: len(rows) for ph, rows in windows.items()}, stderr, clock


def write_traces(raw: Path, dest: Path, *, seconds: float | None = None, updates_only: bool = False,
                 with_nvml: bool = True) -> dict[str, Path]:
    """One trace file per regime the recording holds, under ``dest``, plus ``truth.json``; returns regime ->
    path. ``seconds``: only the first seconds of each regime; ``updates_only``: GPM polls with values only.

    In ``CONTEXT_REGIMES`` the in-context truth (``context_windows`` over the whole regime) goes into
    truth.json under ``context_truth``, and its windows are held out of the trace: the estimate graded
    against them never sees them. truth.json is merged with one already in ``dest`` (a recording of some
    regimes only, ``record --regimes``): regimes this recording lacks keep their trace files, clocks and
    pure-run truth; ``regime_truth`` names the pure-run truth of the recording behind each trace file."""
    from phaselens.gpus import find_gpu_spec
    from phaselens.phase import Clock, Phase, Role
    from phaselens.trace import GpuInfo, MetaRecord, SampleRecord, StepRecord, TraceWriter

    meta, steps, gpm, nvml = load_raw(raw)
    info = meta["info"]
    uuid, name = info.get("uuid", "GPU-bench"), info.get("name", meta["gpu"])
    spec = find_gpu_spec(name)
    gpu = GpuInfo(uuid=uuid, index=0, name=name, peak_bf16_flops=spec.peak_bf16_flops if spec else None,
                  peak_dram_bytes_per_s=spec.peak_dram_bytes_per_s if spec else None)
    dest.mkdir(parents=True, exist_ok=True)
    truth = truth_from_pure(meta, gpm)
    points = truth_points(meta, steps, gpm, nvml)
    regime_spans = [span for span in meta["spans"] if span["kind"] == "regime"]
    clocks: dict[str, dict[str, float | None]] = {}
    for span in regime_spans:
        clocks[span["regime"]] = {
            phase: _clock_during(nvml, [st for st in steps if st["regime"] == span["regime"]
                                        and st["phase"] == phase]) for phase in PHASES}
    pure_clock = {ph: float(np.mean([p["clock_mhz"] or 0.0 for p in pts if p["duty"] == 1.0]))
                  for ph, pts in points.items()}
    held_out: dict[str, set[int]] = {}
    context: dict | None = None
    for span in regime_spans:
        regime = span["regime"]
        if regime not in CONTEXT_REGIMES:
            continue
        mine = [st for st in steps if st["regime"] == regime]
        windows = context_windows(mine, gpm, span["start_ns"], span["end_ns"])
        values, counts, stderr, clock = context_truth(windows, nvml)
        held_out[regime] = {t for rows in windows.values() for t, _ in rows}
        context = {regime: values, "windows": counts, "stderr": stderr, "clock_mhz": clock,
                   "delay_max_ms": CONTEXT_DELAY_MAX_MS, "purity": CONTEXT_PURITY,
                   "span_s": (span["end_ns"] - span["start_ns"]) / 1e9,
                   "held_out_t_ns": sorted(held_out[regime])}

    doc = {"gpu": name, "uuid": uuid, "truth": truth, "truth_clock_mhz": pure_clock, "truth_runs": points,
           "duty_truth": duty_truth(points), "regime_clock_mhz": clocks,
           "regime_truth": {span["regime"]: truth for span in regime_spans}}
    truth_path = dest / "truth.json"
    old = json.loads(truth_path.read_text()) if truth_path.exists() else {}
    for regime in REGIMES:
        if regime in clocks or not (dest / f"regime_{regime}.jsonl").exists() or "truth" not in old:
            continue
        # a trace file from an earlier recording stays: so do its truth and clocks
        doc["regime_truth"][regime] = old.get("regime_truth", {}).get(regime, old["truth"])
        if regime in old.get("regime_clock_mhz", {}):
            doc["regime_clock_mhz"][regime] = old["regime_clock_mhz"][regime]
        if regime in old.get("context_truth", {}):
            context = old["context_truth"]
    if context is not None:
        doc["context_truth"] = context
    truth_path.write_text(json.dumps(doc, indent=1) + "\n")
    paths = {}
    for span in regime_spans:
        regime = span["regime"]
        drop = held_out.get(regime, set())
        t_lo = span["start_ns"]
        t_hi = span["end_ns"] if seconds is None else min(span["end_ns"], t_lo + int(seconds * 1e9))
        path = dest / f"regime_{regime}.jsonl"
        path.unlink(missing_ok=True)
        with TraceWriter(path) as w:
            w.write(MetaRecord(host=meta["host"], gpus=(gpu,)))
            for i, st in enumerate(s for s in steps if s["regime"] == regime and t_lo <= s["t0_ns"] < t_hi):
                ph = Phase.parse(st["phase"])
                w.write(StepRecord(
                    gpu_uuid=uuid, engine_id="bench", role=Role.COLOCATED, phase=ph, step=i,
                    t0_ns=st["t0_ns"], t1_ns=st["t1_ns"], clock=Clock.GPU,
                    prefill_tokens=8192 * st["big"], decode_tokens=16 * (st["skinny"] > 0),
                    batch=16 if st["skinny"] else 1, context_tokens=0,
                    flops=float(st["big"] * meta.get("big_flops", BIG_FLOPS) + st["skinny"] * SKINNY_FLOPS),
                    bytes=float(st["big"] * meta.get("big_bytes", BIG_BYTES) + st["skinny"] * SKINNY_BYTES)))
            for rec in gpm:
                t = (rec["t0"] + rec["t1"]) // 2
                if not t_lo <= t < t_hi or t in drop:
                    continue
                vals = gpm_values(rec)
                if updates_only and vals["sm_active"] is None:
                    continue
                w.write(SampleRecord(gpu_uuid=uuid, source="gpm", t_ns=t, values=vals))
            for rec in nvml if with_nvml else []:
                if t_lo <= rec["t"] < t_hi:
                    keys = ("gpu_util", "mem_util", "power_w", "sm_clock_hz", "mem_used_bytes")
                    w.write(SampleRecord(gpu_uuid=uuid, source="nvml", t_ns=rec["t"],
                                         values={k: rec[k] for k in keys}))
        paths[regime] = path
    return paths


def evaluate(traces: dict[str, Path], truth_doc: dict) -> dict[str, dict]:
    """Per regime, method and truth: the largest absolute error over TRUTH_KEYS x the phases that ran.

    Truths: "pure" (the pure runs of the recording behind the trace, the figure of record), "duty" (the
    duty-cycled truth runs, a diagnostic) and, in ``CONTEXT_REGIMES``, "context" (the windows wholly inside
    one-phase runs of the regime itself, held out of its trace; phases without such windows are left out)."""
    from phaselens.agent.attribution import AttributionConfig, Attributor
    from phaselens.agent.state import GpuIdentity
    from phaselens.phase import Phase
    from phaselens.trace import read_trace

    out: dict[str, dict] = {}
    context = truth_doc.get("context_truth", {})
    for regime, path in traces.items():
        tr = read_trace(path)
        uuid = tr.gpu_uuids()[0]
        ident = GpuIdentity(uuid=uuid, index=0, name=tr.meta.gpus[0].name if tr.meta else "")
        truths = {"pure": truth_doc.get("regime_truth", {}).get(regime, truth_doc["truth"])}
        duty = truth_doc.get("duty_truth", {})
        if all(ph in duty for ph in PHASES):
            truths["duty"] = duty
        out[regime] = {"windows": 0, "offset_ms": None}
        if regime in context:
            truths["context"] = context[regime]
            out[regime]["context_windows"] = context["windows"]
        for method in ("naive", "unmix"):
            attributor = Attributor(AttributionConfig(method=method, horizon_s=3600))
            res = attributor.attribute(ident, tr.steps, tr.samples)
            ran = {st.phase for st in tr.steps}
            out[regime]["windows"] = res.windows
            if method == "unmix" and res.alignment_offset_s is not None:
                out[regime]["offset_ms"] = res.alignment_offset_s * 1e3
            for kind, truth in truths.items():
                worst, detail = 0.0, {}
                for phase in Phase.busy():
                    if phase not in ran or phase.value not in truth:
                        continue
                    pv = res.phases.get(phase)
                    for key in TRUTH_KEYS:
                        est = pv.values.get(key) if pv else None
                        err = 1.0 if est is None else abs(est - truth[phase.value][key])
                        detail[f"{phase.value}.{key}"] = round(err, 4)
                        worst = max(worst, err)
                out[regime][f"{method}_{kind}"] = {"max_abs_error": worst, "errors": detail}
    return out


def print_table(results: dict[str, dict], truth_doc: dict) -> str:
    """Per regime: naive and unmix against the pure-run truth (the target), unmix against the duty-run truth,
    naive and unmix against the in-context truth (8B), the worst unmix term, the SM clock each phase ran at;
    then the truths themselves with their clocks (and the in-context truth's window counts)."""
    clocks = truth_doc.get("regime_clock_mhz", {})

    def fmt(r: dict, key: str) -> str:
        e = r.get(key, {}).get("max_abs_error")
        return "-" if e is None else f"{e:.3f}"

    lines = [f"{'regime':<7} {'naive':>7} {'unmix':>7}  {'unmix vs':>8}  {'naive':>7} {'unmix':>7} "
             f"{'windows':>8}  {'worst unmix term':<28} SM MHz p/d/m",
             f"{'':<7} {'vs pure-run truth':>15}  {'duty 0.5':>8}  {'vs in-context':>15}"]
    for regime, r in results.items():
        worst = max(r["unmix_pure"]["errors"].items(), key=lambda kv: kv[1])
        clk = "/".join("-" if c is None else f"{c:.0f}" for c in clocks.get(regime, {}).values())
        lines.append(f"{regime:<7} {fmt(r, 'naive_pure'):>7} {fmt(r, 'unmix_pure'):>7}"
                     f"  {fmt(r, 'unmix_duty'):>8}  {fmt(r, 'naive_context'):>7}"
                     f" {fmt(r, 'unmix_context'):>7} "
                     f"{r['windows']:>8}  {worst[0] + '=' + format(worst[1], '.3f'):<28} {clk}")
    lines.append("truths (sm / tensor / dram @ SM MHz): pure runs | duty-0.5 runs of the 8B step lengths")
    for ph in PHASES:
        t = truth_doc["truth"][ph]
        row = f"  {ph:<8} {t['sm_active']:.3f} / {t['tensor_active']:.3f} / {t['dram_active']:.3f}"
        row += f" @ {truth_doc.get('truth_clock_mhz', {}).get(ph, 0):.0f}"
        dt = truth_doc.get("duty_truth", {}).get(ph)
        if dt:
            row += (f" | {dt['sm_active']:.3f} / {dt['tensor_active']:.3f} / {dt['dram_active']:.3f}"
                    f" @ {dt['clock_mhz']:.0f}")
        lines.append(row)
    context = truth_doc.get("context_truth", {})
    for regime in (r for r in CONTEXT_REGIMES if r in context and r in results):
        delay = context.get("delay_max_ms", CONTEXT_DELAY_MAX_MS)
        lines.append(f"in-context truth, {regime} (windows inside a one-phase run for every delay"
                     f" 0-{delay:.0f} ms; held out of the estimate):")
        for ph in PHASES:
            n = context["windows"].get(ph, 0)
            t = context[regime].get(ph)
            if t is None:
                lines.append(f"  {ph:<8} no windows")
                continue
            mhz = context.get("clock_mhz", {}).get(ph)
            se = context.get("stderr", {}).get(ph, {})
            lines.append(f"  {ph:<8} {t['sm_active']:.3f} / {t['tensor_active']:.3f} / {t['dram_active']:.3f}"
                         f" @ {'-' if mhz is None else format(mhz, '.0f')}, {n} windows"
                         f" (tensor s.e. {se.get('tensor_active', float('nan')):.3f})")
    text = "\n".join(lines)
    print(text)
    return text


def append_results(text: str, command: str, gpu: str) -> None:
    path = Path(__file__).resolve().parent / "RESULTS.md"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "a") as fh:
        fh.write(f"\n## attribution accuracy ({stamp}, {gpu}, {platform.node()})\n\n`{command}`\n\n"
                 f"Largest absolute error over {{sm_active, tensor_active, dram_active}} x "
                 f"{{prefill, decode, mixed}}"
                 f" per regime; target unmix <= 0.03.\n\n```\n{text}\n```\n")


@click.group()
def main() -> None:
    """Ground-truth attribution benchmark."""


def _parse_regimes(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    names = tuple(r.strip() for r in value.split(",") if r.strip())
    bad = [r for r in names if r not in REGIMES]
    if bad or not names:
        raise click.BadParameter(f"{', '.join(bad) or 'none given'}; expected some of {', '.join(REGIMES)}")
    return names


@main.command("record")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--regime-s", type=float, default=45.0, show_default=True)
@click.option("--pure-s", type=float, default=4.0, show_default=True)
@click.option("--poll-ms", type=float, default=10.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prefill-kernel", type=click.Choice(list(PREFILL_KERNELS)), default="mm8192",
              show_default=True)
@click.option("--regimes", default=",".join(REGIMES), show_default=True, callback=_parse_regimes,
              help="Comma-separated regimes to record (the truth runs always run), e.g. '8b'.")
def record_cmd(out: Path, regime_s: float, pure_s: float, poll_ms: float, seed: int,
               prefill_kernel: str, regimes: tuple[str, ...]) -> None:
    """Run the workload on the GPU and write raw recordings to OUT."""
    record(out, regime_s, pure_s, poll_ms, seed, prefill_kernel, regimes)


@main.command("probe-kernels")
@click.option("--seconds", type=float, default=3.0, show_default=True)
def probe_kernels(seconds: float) -> None:
    """Power, SM clock and GPM activity of each prefill kernel (and decode) run back to back."""
    import pynvml as nv
    import torch

    nv.nvmlInit()
    h = nv.nvmlDeviceGetHandleByIndex(0)
    s1, s2 = nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()
    print(f"{'kernel':<12} {'ms':>7} {'TFLOP/s':>8} {'W':>6} {'MHz':>6} {'sm':>6} {'tensor':>7} {'dram':>6}")
    for name in list(PREFILL_KERNELS) + ["decode"]:
        wl = Workload(prefill_kernel=name if name != "decode" else "mm4096")
        cal = wl.calibrate()
        fn = wl.skinny if name == "decode" else wl.big
        ms = cal["skinny" if name == "decode" else "big"]
        end = time.monotonic() + seconds
        power, clock = [], []
        started = False
        while time.monotonic() < end:
            for _ in range(max(1, int(20 / ms))):
                fn()
            torch.cuda.synchronize()
            if not started and time.monotonic() > end - seconds + 1.0:
                nv.nvmlGpmSampleGet(h, s1)
                started = True
            if started:
                power.append(nv.nvmlDeviceGetPowerUsage(h) / 1000)
                clock.append(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        nv.nvmlGpmSampleGet(h, s2)
        mg = nv.c_nvmlGpmMetricsGet_t()
        mg.version, mg.numMetrics, mg.sample1, mg.sample2 = nv.NVML_GPM_METRICS_GET_VERSION, 3, s1, s2
        for i, mid in enumerate((2, 5, 10)):
            mg.metrics[i].metricId = mid
        nv.nvmlGpmMetricsGet(mg)
        tf = (wl.big_flops / ms / 1e9) if name != "decode" else 0.0
        print(f"{name:<12} {ms:>7.3f} {tf:>8.0f} {np.mean(power):>6.0f} {np.mean(clock):>6.0f} "
              f"{mg.metrics[0].value / 100:>6.3f} {mg.metrics[1].value / 100:>7.3f} "
              f"{mg.metrics[2].value / 100:>6.3f}",
              flush=True)
        del wl
        torch.cuda.empty_cache()
        time.sleep(1.0)


@main.command("evaluate")
@click.option("--raw", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True)
@click.option("--traces", type=click.Path(path_type=Path), default=None, help="Write full traces here.")
@click.option("--fixtures", type=click.Path(path_type=Path), default=None,
              help="Also write small fixtures (updates only, first --fixture-s seconds) here.")
@click.option("--fixture-s", type=float, default=30.0, show_default=True)
@click.option("--results-md/--no-results-md", default=False, help="Append the table to bench/RESULTS.md.")
def evaluate_cmd(raw: Path, traces: Path | None, fixtures: Path | None, fixture_s: float,
                 results_md: bool) -> None:
    """Turn raw recordings into traces and report naive vs unmix error per regime."""
    import tempfile

    dest = traces or Path(tempfile.mkdtemp(prefix="phaselens-gt-"))
    paths = write_traces(raw, dest)
    truth_doc = json.loads((dest / "truth.json").read_text())
    if fixtures:
        write_traces(raw, fixtures, seconds=fixture_s, updates_only=True, with_nvml=False)
    results = evaluate(paths, truth_doc)
    text = print_table(results, truth_doc)
    (dest / "results.json").write_text(json.dumps(results, indent=1))
    if results_md:
        command = "python3 bench/attribution_accuracy.py " + " ".join(sys.argv[1:])
        append_results(text, command, truth_doc["gpu"])


if __name__ == "__main__":
    main()
