"""Fleet: per-node and per-GPU tables, fleet-level per-phase aggregates, disaggregation candidates.

The aggregates and the candidate flag come from the recording rules in deploy/prometheus/.
"""

from __future__ import annotations

from phaselens.dashboards.common import GPU_SEL, MODEL_SEL, dashboard, m, sel, table, timeseries

UTIL = m("phaselens_phase_utilization_ratio")
SHARE = m("phaselens_phase_time_ratio")
MFU = m("phaselens_phase_mfu_ratio")
MBU = m("phaselens_phase_mbu_ratio")
GPUS = m("phaselens_agent_gpus")

NODE = "hostname"
GPU = "hostname, gpu, gpu_uuid, model_name"


def util(by: str, phase: str, metric: str) -> str:
    return f"avg by ({by}) ({UTIL}" + sel(GPU_SEL, phase=phase, metric=metric) + ")"


dashboard = dashboard(
    title="phaselens / Fleet",
    uid="phaselens-fleet",
    description="Every node and GPU at a glance, and which of them are candidates for prefill/decode split.",
    panels=[
        table("Nodes", [
            (f"sum by ({NODE}) ({GPUS}" + sel('hostname=~"$hostname"') + ")", "GPUs"),
            (f"avg by ({NODE}) (1 - {SHARE}" + sel(GPU_SEL, phase="idle") + ")", "busy share"),
            (util(NODE, "prefill", "tensor_active"), "prefill tensor"),
            (util(NODE, "decode", "dram_active"), "decode DRAM"),
        ], "percentunit", (0, 0, 24, 7)),
        table("GPUs", [
            (f"avg by ({GPU}) ({SHARE}" + sel(GPU_SEL, phase="decode") + ")", "decode time share"),
            (util(GPU, "prefill", "tensor_active"), "prefill tensor"),
            (util(GPU, "decode", "dram_active"), "decode DRAM"),
            (f"avg by ({GPU}) ({MFU}" + sel(GPU_SEL, phase="prefill") + ")", "prefill MFU"),
            (f"avg by ({GPU}) ({MBU}" + sel(GPU_SEL, phase="decode") + ")", "decode MBU"),
        ], "percentunit", (0, 7, 24, 9)),
        table("Disaggregation candidates (1 = decode DRAM-bound while prefill tensor-bound)", [
            ("phaselens:disaggregation_candidate" + sel(GPU_SEL), "candidate"),
        ], "none", (0, 16, 12, 8),
            description="Recording rule phaselens:disaggregation_candidate; the alert "
                        "PhaselensDisaggregationCandidate fires after an hour at 1."),
        timeseries("Fleet utilization by phase (per model)",
                   [("phaselens:phase_utilization_ratio:avg"
                     + sel(MODEL_SEL, metric="~tensor_active|dram_active"),
                     "{{model_name}} {{phase}} {{metric}}")],
                   "percentunit", (12, 16, 12, 8), ratio=True),
        timeseries("Fleet GPU-seconds per second by phase",
                   [("phaselens:phase_busy_seconds:rate1m" + sel(MODEL_SEL), "{{model_name}} {{phase}}")],
                   "short", (0, 24, 12, 8), stacked=True),
        timeseries("Fleet phase time share", [("phaselens:phase_time_ratio:avg" + sel(MODEL_SEL),
                                               "{{model_name}} {{phase}}")],
                   "percentunit", (12, 24, 12, 8), stacked=True, ratio=True),
    ],
)
