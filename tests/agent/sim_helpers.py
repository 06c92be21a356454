"""Synthetic timelines and simulated counters for the attribution tests (no GPU needed)."""

from __future__ import annotations

import random

from phaselens.agent.samplers.simulated import SimulatedGpuModel, SimulatedSampler
from phaselens.agent.timeline import Timeline
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import SampleRecord, StepRecord

T0 = 1_800_000_000_000_000_000


def step(uuid: str, phase: Phase, t0: int, t1: int, i: int = 0, flops: float = 0.0, nbytes: float = 0.0
         ) -> StepRecord:
    return StepRecord(gpu_uuid=uuid, engine_id="e0", role=Role.COLOCATED, phase=phase, step=i, t0_ns=t0,
                      t1_ns=t1, clock=Clock.GPU, prefill_tokens=512 if phase != Phase.DECODE else 0,
                      decode_tokens=8 if phase != Phase.PREFILL else 0, batch=8, context_tokens=1024,
                      flops=flops, bytes=nbytes)


def engine_like_steps(uuid: str, seconds: float, seed: int = 0) -> list[StepRecord]:
    """8B-shaped: runs of ~10 ms decode steps broken by ~45 ms prefill chunks or ~20 ms mixed steps,
    with random idle gaps."""
    rng = random.Random(seed)
    t, end, out = T0, T0 + int(seconds * 1e9), []
    while t < end:
        plan = [(Phase.DECODE, rng.uniform(8, 12)) for _ in range(rng.randint(2, 25))]
        kind = rng.choice((Phase.PREFILL, Phase.MIXED, Phase.MIXED))
        plan += [(kind, rng.uniform(40, 50) if kind == Phase.PREFILL else rng.uniform(17, 23))
                 for _ in range(rng.randint(1, 4))]
        for phase, ms in plan:
            if rng.random() < 0.05:
                t += int(rng.uniform(5, 150) * 1e6)
            t1 = t + int(ms * 1e6)
            out.append(step(uuid, phase, t, t1, len(out), flops=ms * 1e-3 * 5e14, nbytes=ms * 1e-3 * 1e12))
            t = t1
    return out


class FakeClock:
    def __init__(self, t: int):
        self.t = t

    def __call__(self) -> int:
        return self.t


def simulate(steps: list[StepRecord], uuid: str, seconds: float, model: SimulatedGpuModel,
             poll_ms: float = 10.0, seed: int = 0) -> list[SampleRecord]:
    """Poll a SimulatedSampler over ``steps`` every ``poll_ms`` for ``seconds``."""
    tl = Timeline(horizon_s=seconds + 10)
    for s in steps:
        tl.add_step(s)
    clock = FakeClock(T0)
    sampler = SimulatedSampler([uuid], tl, model=model, seed=seed, clock=clock)
    out = []
    for _ in range(int(seconds * 1000 / poll_ms)):
        out.extend(sampler.sample())
        clock.t += int(poll_ms * 1e6)
    return out
