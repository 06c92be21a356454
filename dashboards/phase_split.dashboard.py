"""Phase split: prefill vs decode, per metric, over time (the plot the article asks for).

Generated into ``phase_split.json`` by ``phaselens dashboards generate``.
"""

from __future__ import annotations

from phaselens.dashboards.common import GPU_SEL, RATE, dashboard, m, sel, timeseries

UTIL = m("phaselens_phase_utilization_ratio")
BLENDED = m("phaselens_gpu_utilization_ratio")
SHARE = m("phaselens_phase_time_ratio")
MFU = m("phaselens_phase_mfu_ratio")
MBU = m("phaselens_phase_mbu_ratio")
BUSY = m("phaselens_phase_busy_seconds_total")
TOKENS = m("phaselens_phase_tokens_total")
STEP = m("phaselens_step_duration_seconds")
UNC = m("phaselens_phase_utilization_uncertainty_ratio")

#: The main panel's query (also rendered by `phaselens dashboards preview`).
MAIN_QUERY = (f"avg by (phase, metric) ({UTIL}"
              + sel(GPU_SEL, phase="~prefill|decode", metric="~tensor_active|dram_active") + ")")

dashboard = dashboard(
    title="phaselens / Phase split",
    uid="phaselens-phase-split",
    description="Prefill and decode measured separately: what a blended GPU utilization hides.",
    panels=[
        timeseries("Prefill vs decode: tensor and DRAM activity", [(MAIN_QUERY, "{{phase}} {{metric}}")],
                   "percentunit", (0, 0, 24, 10), ratio=True,
                   description="Attributed activity while each phase runs (tensor-bound prefill, "
                               "DRAM-bound decode). Averaged over the selected GPUs."),
        timeseries("Blended (one number per GPU, as nvidia-smi/DCGM show it)",
                   [(f"avg by (metric) ({BLENDED}" + sel(GPU_SEL) + ")", "{{metric}}")],
                   "percentunit", (0, 10, 12, 8), ratio=True),
        timeseries("Split by phase", [(f"avg by (phase, metric) ({UTIL}" + sel(GPU_SEL) + ")",
                                       "{{phase}} {{metric}}")],
                   "percentunit", (12, 10, 12, 8), ratio=True),
        timeseries("Phase time share", [(f"avg by (phase) ({SHARE}" + sel(GPU_SEL) + ")", "{{phase}}")],
                   "percentunit", (0, 18, 8, 8), stacked=True, ratio=True),
        timeseries("MFU by phase", [(f"avg by (phase) ({MFU}" + sel(GPU_SEL) + ")", "{{phase}}")],
                   "percentunit", (8, 18, 8, 8), ratio=True),
        timeseries("MBU by phase", [(f"avg by (phase) ({MBU}" + sel(GPU_SEL) + ")", "{{phase}}")],
                   "percentunit", (16, 18, 8, 8), ratio=True),
        timeseries("GPU busy time by phase (s/s)",
                   [(f"sum by (phase) (rate({BUSY}" + sel(GPU_SEL) + f"[{RATE}]))", "{{phase}}")],
                   "s", (0, 26, 8, 8), stacked=True),
        timeseries("Tokens/s by step phase and kind",
                   [(f"sum by (phase, kind) (rate({TOKENS}" + sel(GPU_SEL) + f"[{RATE}]))",
                     "{{phase}} {{kind}}")],
                   "short", (8, 26, 8, 8)),
        timeseries("Step duration p50 / p99 by phase",
                   [(f"histogram_quantile({q}, sum by (phase, le) (rate({STEP}_bucket" + sel(GPU_SEL)
                     + f"[{RATE}])))", f"p{int(q * 100)} {{{{phase}}}}") for q in (0.5, 0.99)],
                   "s", (16, 26, 8, 8)),
        timeseries("Attribution standard error", [(f"max by (phase, metric) ({UNC}" + sel(GPU_SEL) + ")",
                                                   "{{phase}} {{metric}}")],
                   "percentunit", (0, 34, 24, 6),
                   description="Large values: too few counter windows or phases that never run alone."),
    ],
)
