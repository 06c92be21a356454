"""Agent states for exporter tests: one with every agent metric populated, and the start-up edge cases."""

from __future__ import annotations

import time

from phaselens.agent.state import AgentState, GpuAttribution, GpuIdentity, PhaseValues, SamplerHealth
from phaselens.phase import Clock, Phase, Role
from phaselens.trace import StepRecord

H100 = "NVIDIA H100 80GB HBM3"
GPU0 = GpuIdentity(uuid="GPU-1111", index=0, name=H100, model_name="tiny", role="colocated",
                   pod="engine-0", namespace="llm", container="engine", source="gpm")
GPU1 = GpuIdentity(uuid="GPU-2222", index=1, name=H100, model_name="tiny", role="colocated", source="gpm")


def _step(uuid: str, phase: Phase, n: int, t0: int, dur_ns: int, prefill: int, decode: int) -> StepRecord:
    return StepRecord(gpu_uuid=uuid, engine_id="e0", role=Role.COLOCATED, phase=phase, step=n, t0_ns=t0,
                      t1_ns=t0 + dur_ns, clock=Clock.HOST, prefill_tokens=prefill, decode_tokens=decode,
                      batch=max(1, decode), context_tokens=prefill + decode, flops=1e12, bytes=1e9)


def full_state() -> AgentState:
    """A state in which every agent metric of the catalogue has at least one series."""
    state = AgentState("node-a")
    state.set_gpus([GPU0, GPU1])
    now = time.time_ns()
    for gpu in (GPU0, GPU1):
        state.publish_attribution(GpuAttribution(
            gpu=gpu,
            phases={
                Phase.PREFILL: PhaseValues(0.3, {"sm_active": 0.95, "tensor_active": 0.9, "dram_active": 0.3},
                                           {"sm_active": 0.01, "tensor_active": 0.02, "dram_active": 0.01},
                                           mfu=0.6, mbu=0.2),
                Phase.DECODE: PhaseValues(0.5, {"sm_active": 0.6, "tensor_active": 0.2, "dram_active": 0.85},
                                          {"sm_active": 0.02, "tensor_active": 0.01, "dram_active": 0.03},
                                          mfu=0.05, mbu=0.7),
            },
            time_share={Phase.PREFILL: 0.3, Phase.DECODE: 0.5, Phase.MIXED: 0.05, Phase.IDLE: 0.15},
            blended={"sm_active": 0.7, "tensor_active": 0.4, "dram_active": 0.6, "gpu_util": 0.85},
            alignment_offset_s=-0.048, windows=237, updated_ns=now - 2_000_000_000,
        ))
        t = now - 10_000_000_000
        for n in range(6):
            state.observe_step(_step(gpu.uuid, Phase.PREFILL, n, t, 150_000_000, 2048, 0))
            state.observe_step(_step(gpu.uuid, Phase.DECODE, n, t + 200_000_000, 20_000_000, 0, 32))
            t += 400_000_000
        state.update_raw(gpu.uuid, {"power_w": 548.8, "sm_clock_hz": 1.98e9, "mem_used_bytes": 7.0e10,
                                    "gpu_util": 0.9, "sm_active": None})
    state.sampler_result(SamplerHealth("nvml", True, 0.0004))
    state.sampler_result(SamplerHealth("gpm", False, 0.002, last_error="NVML_ERROR_NOT_SUPPORTED"))
    state.count_received(12)
    state.count_rejected("bad_json", 2)
    state.count_rejected("unknown_gpu", 1)
    state.mark_started()
    return state
