"""Agent health: is each node agent up, sampling, receiving step events and attributing?"""

from __future__ import annotations

from phaselens.dashboards.common import GPU_SEL, HOST_SEL, RATE, dashboard, m, sel, stat, table, timeseries

dashboard = dashboard(
    title="phaselens / Agent health",
    uid="phaselens-agent-health",
    description="Start-up, GPUs found, sampler success and latency, shim events, attribution state.",
    panels=[
        stat("Agents started", [(f"sum({m('phaselens_agent_started')}" + sel(HOST_SEL) + ")", "")],
             "none", (0, 0, 6, 4)),
        stat("GPUs watched", [(f"sum({m('phaselens_agent_gpus')}" + sel(HOST_SEL) + ")", "")],
             "none", (6, 0, 6, 4)),
        stat("Failed samplers", [(f"sum({m('phaselens_agent_samplers_failed')}" + sel(HOST_SEL) + ")", "")],
             "none", (12, 0, 6, 4)),
        stat("Scrape errors (state read)",
             [(f"sum({m('phaselens_agent_collect_errors_total')}" + sel(HOST_SEL) + ")", "")],
             "none", (18, 0, 6, 4)),
        table("Agents", [(f"max by (hostname, version) ({m('phaselens_agent_info')}" + sel(HOST_SEL) + ")",
                          "version")], "none", (0, 4, 24, 5)),
        timeseries("Sampler success", [(m("phaselens_sampler_success") + sel(HOST_SEL),
                                        "{{hostname}} {{sampler}}")], "none", (0, 9, 12, 8)),
        timeseries("Sampler poll duration", [(m("phaselens_sampler_duration_seconds") + sel(HOST_SEL),
                                              "{{hostname}} {{sampler}}")], "s", (12, 9, 12, 8)),
        timeseries("Shim events received/s",
                   [(f"sum by (hostname) (rate({m('phaselens_shim_events_received_total')}" + sel(HOST_SEL)
                     + f"[{RATE}]))", "{{hostname}}")], "short", (0, 17, 12, 8)),
        timeseries("Shim events rejected/s by reason",
                   [(f"sum by (hostname, reason) (rate({m('phaselens_shim_events_rejected_total')}"
                     + sel(HOST_SEL) + f"[{RATE}]))", "{{hostname}} {{reason}}")], "short", (12, 17, 12, 8)),
        timeseries("Attribution offset", [(m("phaselens_attribution_offset_seconds") + sel(GPU_SEL),
                                           "{{hostname}} GPU {{gpu}}")], "s", (0, 25, 8, 8)),
        timeseries("Attribution windows", [(m("phaselens_attribution_windows") + sel(GPU_SEL),
                                            "{{hostname}} GPU {{gpu}}")], "short", (8, 25, 8, 8)),
        timeseries("Attribution age", [(m("phaselens_attribution_age_seconds") + sel(GPU_SEL),
                                        "{{hostname}} GPU {{gpu}}")], "s", (16, 25, 8, 8)),
        timeseries("Scrape target up", [('up{job=~"phaselens.*"}', "{{job}} {{instance}}")], "none",
                   (0, 33, 24, 6)),
        timeseries("GPU power (latest NVML reading)", [(m("phaselens_gpu_power_watts") + sel(GPU_SEL),
                                                        "{{hostname}} GPU {{gpu}}")], "watt", (0, 39, 8, 8)),
        timeseries("SM clock", [(m("phaselens_gpu_sm_clock_hertz") + sel(GPU_SEL),
                                 "{{hostname}} GPU {{gpu}}")], "hertz", (8, 39, 8, 8)),
        timeseries("GPU memory used", [(m("phaselens_gpu_memory_used_bytes") + sel(GPU_SEL),
                                        "{{hostname}} GPU {{gpu}}")], "bytes", (16, 39, 8, 8)),
        timeseries("Failed sampler polls/s (lost GPU, NVML error or timeout, exporter down or garbled)",
                   [(f"sum by (hostname, sampler) (rate({m('phaselens_sampler_errors_total')}" + sel(HOST_SEL)
                     + f"[{RATE}]))", "{{hostname}} {{sampler}}")], "short", (0, 47, 16, 8)),
        stat("Trace recorders stopped (write error)",
             [(f"sum({m('phaselens_agent_recorder_failed')}" + sel(HOST_SEL) + ")", "")], "none",
             (16, 47, 8, 8)),
        timeseries("Engines' phase records sent and dropped/s (dropped: no agent, or its queue full)",
                   [(f"sum by (hostname) (rate({m('phaselens_engine_shim_records_sent_total')}"
                     + sel(HOST_SEL) + f"[{RATE}]))", "{{hostname}} sent"),
                    (f"sum by (hostname) (rate({m('phaselens_engine_shim_records_dropped_total')}"
                     + sel(HOST_SEL) + f"[{RATE}]))", "{{hostname}} dropped")], "short", (0, 55, 24, 8)),
    ],
)
