"""Synthetic inputs for the advisor's tests: step records from known coefficients, request logs, traces.

The step records are what an engine with exactly these step times would emit (plus seeded multiplicative
noise), so a fit can be checked against the truth; they stand in for GPU traces on the CPU test machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from phaselens.phase import Clock, Phase, Role
from phaselens.trace import GpuInfo, MetaRecord, StepRecord, TraceWriter

H100 = "NVIDIA H100 80GB HBM3"

#: Step-time coefficients (seconds) of roughly an 8B model on one H100: prefill a + b*l + c*l^2,
#: decode a + b*context + c*batch, above the knee a steeper batch term.
TRUE = {
    "prefill": (0.012, 6.0e-5, 4.0e-9),
    "decode": (0.0075, 2.0e-8, 2.0e-5),
    "decode_large": (0.0055, 2.0e-8, 6.0e-5),
    "knee": 64,
}


def synth_steps(
    n_prefill: int = 60,
    n_decode: int = 120,
    *,
    seed: int = 0,
    noise: float = 0.02,
    coeffs: dict = TRUE,
    knee: bool = True,
    n_mixed: int = 0,
) -> list[StepRecord]:
    rng = np.random.default_rng(seed)
    pa, pb, pc = coeffs["prefill"]
    steps: list[StepRecord] = []
    t = 1_000_000_000

    def add(phase: Phase, dur: float, prefill_tokens: int, decode_tokens: int, batch: int, ctx: int) -> None:
        nonlocal t
        d = int(dur * (1 + noise * rng.standard_normal()) * 1e9)
        steps.append(
            StepRecord(
                "GPU-test-0",
                "e0",
                Role.COLOCATED,
                phase,
                len(steps),
                t,
                t + max(d, 1),
                Clock.GPU,
                prefill_tokens,
                decode_tokens,
                batch,
                ctx,
                0.0,
                0.0,
            )
        )
        t += max(d, 1) + 1000

    for _ in range(n_prefill):
        n = int(rng.integers(16, 4096))
        p = int(rng.integers(0, 1024)) if rng.random() < 0.3 else 0
        add(Phase.PREFILL, pa + pb * n + pc * (n * n + 2 * n * p), n, 0, 1, n + p)
    for _ in range(n_decode):
        b = int(rng.integers(1, 160 if knee else 60))
        ctx = int(b * rng.integers(200, 3000))
        key = "decode_large" if knee and b >= coeffs["knee"] else "decode"
        da, db, dc = coeffs[key]
        add(Phase.DECODE, da + db * ctx + dc * b, 0, b, b, ctx)
    for _ in range(n_mixed):
        n = int(rng.integers(64, 1024))
        b = int(rng.integers(1, 32))
        ctx = int(b * rng.integers(200, 2000))
        da, db, dc = coeffs["decode"]
        add(Phase.MIXED, max(pa, da) + pb * n + pc * n * n + db * ctx + dc * b, n, b, b + 1, ctx + n)
    return steps


def write_trace(path: Path, steps: Sequence[StepRecord], gpu_name: str = H100) -> Path:
    with TraceWriter(path) as w:
        w.write(MetaRecord(host="test", gpus=(GpuInfo("GPU-test-0", 0, gpu_name),)))
        for s in steps:
            w.write(s)
    return path


def write_request_log(
    path: Path,
    prompt: Sequence[int],
    output: Sequence[int],
    *,
    rate: float,
    seed: int = 0,
    cached: Sequence[int] | None = None,
    sessions: Sequence[str | None] | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    t = 1_700_000_000_000_000_000
    with path.open("w") as f:
        for i, (p, o) in enumerate(zip(prompt, output)):
            t += int(rng.exponential(1.0 / rate) * 1e9)
            rec = {
                "type": "request",
                "request_id": f"cmpl-{i}",
                "arrival_ns": t,
                "first_token_ns": t + 1000,
                "finish_ns": t + 2000,
                "prompt_tokens": int(p),
                "cached_tokens": int(cached[i]) if cached else 0,
                "output_tokens": int(o),
                "worker": "w0",
                "role": "colocated",
                "status": "ok",
                "finish_reason": "length",
                "session_id": sessions[i] if sessions else None,
            }
            f.write(json.dumps(rec) + "\n")
    return path
