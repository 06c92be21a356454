"""Serving: request latencies (TTFT, ITL, TPOT percentiles), queue, KV cache, KV hand-off in split mode."""

from __future__ import annotations

from phaselens.dashboards.common import ENGINE_SEL, RATE, SPLIT_MODE_ONLY, dashboard, m, sel, timeseries

TTFT = m("phaselens_engine_time_to_first_token_seconds")
ITL = m("phaselens_engine_inter_token_latency_seconds")
TPOT = m("phaselens_engine_time_per_output_token_seconds")
E2E = m("phaselens_engine_request_duration_seconds")
KV = m("phaselens_engine_kv_cache_usage_ratio")
KVX = m("phaselens_engine_kv_transfer_seconds")
WAITING = m("phaselens_engine_requests_waiting")
RUNNING = m("phaselens_engine_requests_running")
REQUESTS = m("phaselens_engine_requests_total")
HIT = m("phaselens_engine_prefix_cache_hit_ratio")


def percentiles(hist: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99), by: str = "") -> list[tuple[str, str]]:
    group = f"{by}, le" if by else "le"
    legend = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({hist}_bucket" + sel(ENGINE_SEL)
             + f"[{RATE}])))", f"p{int(q * 100)}{legend}") for q in qs]


dashboard = dashboard(
    title="phaselens / Serving",
    uid="phaselens-serving",
    description="What clients see: TTFT and inter-token latency percentiles, queue, KV cache.",
    panels=[
        timeseries("Time to first token", percentiles(TTFT), "s", (0, 0, 12, 8)),
        timeseries("Inter-token latency", percentiles(ITL), "s", (12, 0, 12, 8)),
        timeseries("Time per output token (per request)", percentiles(TPOT), "s", (0, 8, 12, 8)),
        timeseries("End-to-end request duration", percentiles(E2E), "s", (12, 8, 12, 8)),
        timeseries("Queue: waiting and running requests",
                   [(f"sum by (role) ({WAITING}" + sel(ENGINE_SEL) + ")", "waiting {{role}}"),
                    (f"sum by (role) ({RUNNING}" + sel(ENGINE_SEL) + ")", "running {{role}}")],
                   "short", (0, 16, 8, 8)),
        timeseries("KV cache usage", [(f"max by (worker) ({KV}" + sel(ENGINE_SEL) + ")", "{{worker}}")],
                   "percentunit", (8, 16, 8, 8), ratio=True),
        timeseries("Requests/s by status",
                   [(f"sum by (status) (rate({REQUESTS}" + sel(ENGINE_SEL) + f"[{RATE}]))", "{{status}}")],
                   "reqps", (16, 16, 8, 8)),
        timeseries("Prefix cache hit ratio", [(f"avg by (worker) ({HIT}" + sel(ENGINE_SEL) + ")",
                                               "{{worker}}")],
                   "percentunit", (0, 24, 12, 8), ratio=True),
        timeseries("Engine tokens/s by step phase",
                   [(f"sum by (phase, kind) (rate({m('phaselens_engine_tokens_total')}" + sel(ENGINE_SEL)
                     + f"[{RATE}]))", "{{phase}} {{kind}}")], "short", (0, 32, 8, 8)),
        timeseries("Engine step duration p50 / p99 (host view)",
                   [(f"histogram_quantile({q}, sum by (phase, le) "
                     f"(rate({m('phaselens_engine_step_duration_seconds')}_bucket" + sel(ENGINE_SEL)
                     + f"[{RATE}])))", f"p{int(q * 100)} {{{{phase}}}}") for q in (0.5, 0.99)],
                   "s", (8, 32, 8, 8)),
        timeseries("Workers alive", [(f"sum by (role) ({m('phaselens_engine_workers_alive')}"
                                      + sel(ENGINE_SEL) + ")", "{{role}}")], "short", (16, 32, 8, 8)),
        timeseries("KV transfer time, prefill to decode", percentiles(KVX, (0.5, 0.99)), "s", (12, 24, 12, 8),
                   description=f"Hand-off of a request's KV cache between pools {SPLIT_MODE_ONLY}."),
    ],
    with_gpu=True,
)
