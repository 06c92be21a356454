"""The advisor's report: terminal (rich tables), JSON, a self-contained HTML page, and Prometheus metrics.

Every verdict prints its inputs (workload, SLOs, cluster, step model with its held-out error) and the rule
that decided it, with the computed reasons. The HTML page embeds its plots as inline SVG (no scripts, no
external files): the prefill/decode time share over time from the step records (the two lines), goodput
per GPU of every screened placement against colocated, the simulated TTFT and TPOT distributions of the
finalists, and the cost both ways.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from phaselens.advisor.search import Advice, Finalist
from phaselens.phase import Phase
from phaselens.trace import SampleRecord, StepRecord

# ---------------------------------------------------------------------- JSON


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if not math.isfinite(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def to_dict(advice: Advice) -> dict[str, Any]:
    """Everything in the report as plain JSON-able data (infinities become null)."""
    cl, slo = advice.cluster, advice.slo
    rec = advice.recommended
    return _clean(
        {
            "verdict": advice.verdict,
            "recommended": None if rec is None else rec.to_dict(),
            "gain": advice.gain,
            "margin": advice.margin,
            "rule": advice.rule,
            "reasons": [r.to_dict() for r in advice.reasons],
            "robustness": advice.robustness,
            "gpus_needed_at_rate": advice.gpus_needed,
            "yearly_saving": advice.yearly_saving,
            "not_recommended_because": advice.rejections,
            # the simulated goodput (req/s over the whole placement) of the best of each kind
            "predicted_goodput_rps": {
                k: (None if f is None else f.goodput)
                for k, f in (
                    ("colocated", advice.colocated),
                    ("split", advice.split),
                    ("conditional", advice.conditional),
                )
            },
            "finalists": {
                k: (None if f is None else f.to_dict())
                for k, f in (
                    ("colocated", advice.colocated),
                    ("split", advice.split),
                    ("conditional", advice.conditional),
                )
            },
            "screen": [c.to_dict() for c in advice.screen_candidates],
            "inputs": {
                "workload": advice.workload.summary(),
                "slo": {
                    "ttft_s": slo.ttft_s,
                    "tpot_s": slo.tpot_s,
                    "ttft_pct": slo.ttft_pct,
                    "tpot_pct": slo.tpot_pct,
                    "attainment": slo.attainment,
                    "text": slo.describe(),
                },
                "cluster": {
                    "gpus": cl.gpus,
                    "gpu": cl.gpu.name,
                    "gpus_per_node": cl.gpus_per_node,
                    "kv_link_gbps": cl.kv_link_gbps,
                    "price_per_gpu_hour": cl.price_per_gpu_hour,
                    "model": cl.model.name,
                    "tp_degrees": list(cl.candidate_tp()),
                },
                "step_model": advice.model.to_dict(),
            },
            "notes": advice.notes,
        }
    )


def to_json(advice: Advice) -> str:
    return json.dumps(to_dict(advice), indent=2)


# ---------------------------------------------------------------------- terminal


def _ms(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v * 1e3:.1f} ms"


def render_terminal(advice: Advice, console: Any = None) -> None:
    """Print the report with rich tables."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    wl = advice.workload.summary()
    cl, slo = advice.cluster, advice.slo
    con.print(
        f"[bold]phaselens advise[/bold]: {cl.model.name} on {cl.gpus} x {cl.gpu.name}, {slo.describe()}"
    )
    con.print(
        f"workload ({wl['source']}): {wl['rate_rps']:.3g} req/s, burstiness {wl['burstiness']:.2g}, prompt "
        "mean "
        f"{wl['prompt_mean']:.0f} (P90 {wl['prompt_p90']:.0f}), output mean {wl['output_mean']:.0f} "
        f"(P90 {wl['output_p90']:.0f}), prefix hits {wl['prefix_hit_rate']:.0%}"
    )

    sm = advice.model
    t = Table(title="step-time model (seconds)")
    for col in ("TP", "source", "prefill a, b, c", "decode a, b, c", "knee"):
        t.add_column(col)
    for tp, co in sorted(sm.by_tp.items()):
        t.add_row(
            str(tp),
            co.source,
            f"{co.prefill.a:.3g}, {co.prefill.b:.3g}, {co.prefill.c:.3g}",
            f"{co.decode.a:.3g}, {co.decode.b:.3g}, {co.decode.c:.3g}",
            str(co.knee or "-"),
        )
    con.print(t)
    if sm.holdout_error:
        errs = ", ".join(f"{k} {v:.1%}" for k, v in sm.holdout_error.items())
        con.print(f"held-out mean relative error: {errs} (steps used: {sm.steps_used})")

    t = Table(title="finalists (simulated goodput)")
    for col in (
        "kind",
        "placement",
        "GPUs",
        "goodput req/s",
        "per GPU",
        "closed form per GPU",
        "P-TTFT",
        "P-TPOT",
        "ITL p99",
        f"GPUs @ {advice.workload.rate:.3g} req/s",
    ):
        t.add_column(col)
    for kind, fin in (
        ("colocated", advice.colocated),
        ("split", advice.split),
        ("conditional", advice.conditional),
    ):
        if fin is None:
            continue
        res = fin.result
        t.add_row(
            kind,
            fin.placement.label,
            str(fin.placement.gpus),
            f"{fin.goodput:.3g}",
            f"{fin.per_gpu:.3g}",
            f"{fin.candidate.per_gpu:.3g}",
            _ms(res.ttft_q if res else None),
            _ms(res.tpot_q if res else None),
            _ms(res.itl_quantile(0.99) if res else None),
            str(advice.gpus_needed.get(kind) or "-"),
        )
    con.print(t)

    t = Table(title="reasons (computed)")
    for col in ("", "reason", "value", "threshold", "detail"):
        t.add_column(col)
    for r in advice.reasons:
        t.add_row("!" if r.triggered else " ", r.code, f"{r.value:.3g}", f"{r.threshold:.3g}", r.text)
    con.print(t)
    con.print(f"rule: {advice.rule}")
    for k, checks in advice.robustness.items():
        con.print(f"robustness ({k}): " + ", ".join(f"{n} {v:.3g}" for n, v in checks.items()))
    verdict = advice.verdict.upper()
    con.print(f"[bold]verdict: {verdict}[/bold]  (best alternative's gain {advice.gain:+.1%} vs margin "
              f"{advice.margin:.1%})")
    for why in advice.rejections:
        con.print(f"not recommended: {why}")
    if advice.yearly_saving is not None:
        con.print(f"yearly saving at ${cl.price_per_gpu_hour:g}/GPU-hour: ${advice.yearly_saving:,.0f}")
    for note in advice.notes:
        con.print(f"note: {note}")


# ---------------------------------------------------------------------- HTML and SVG


def _svg_lines(
    series: Sequence[tuple[str, str, np.ndarray, np.ndarray]],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 640,
    height: int = 260,
) -> str:
    xs = [s[2] for s in series if len(s[2])]
    ys = [s[3] for s in series if len(s[3])]
    if not xs:
        return f"<p>{html.escape(title)}: no data</p>"
    x0, x1 = min(float(x.min()) for x in xs), max(float(x.max()) for x in xs)
    y0, y1 = 0.0, max(1e-12, max(float(np.nanmax(y)) for y in ys))
    x1 = x1 if x1 > x0 else x0 + 1
    ml, mb, mt, mr = 56, 36, 24, 12

    def px(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * (width - ml - mr)

    def py(y: float) -> float:
        return height - mb - (y - y0) / (y1 - y0) * (height - mb - mt)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<text x="{ml}" y="16" font-size="13">{html.escape(title)}</text>',
        f'<line x1="{ml}" y1="{height - mb}" x2="{width - mr}" y2="{height - mb}" stroke="#444"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{height - mb}" stroke="#444"/>',
        f'<text x="{width / 2}" y="{height - 6}" font-size="11" '
        f'text-anchor="middle">{html.escape(xlabel)}</text>',
        f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>',
    ]
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        parts.append(
            f'<text x="{ml - 4}" y="{py(yv) + 4:.1f}" font-size="10" text-anchor="end">{yv:.3g}</text>'
        )
        xv = x0 + frac * (x1 - x0)
        parts.append(
            f'<text x="{px(xv):.1f}" y="{height - mb + 14}" font-size="10" '
            f'text-anchor="middle">{xv:.3g}</text>'
        )
    for i, (name, color, x, y) in enumerate(series):
        pts = " ".join(
            f"{px(float(a)):.1f},{py(float(b)):.1f}" for a, b in zip(x, y) if math.isfinite(float(b))
        )
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{pts}"/>')
        parts.append(
            f'<text x="{width - mr - 4}" y="{mt + 14 * (i + 1)}" font-size="11" fill="{color}" '
            f'text-anchor="end">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _svg_bars(rows: Sequence[tuple[str, float, str]], title: str, xlabel: str, width: int = 640) -> str:
    if not rows:
        return f"<p>{html.escape(title)}: no data</p>"
    bar, gap, ml = 16, 4, 300
    height = 30 + len(rows) * (bar + gap) + 24
    vmax = max(max(v for _, v, _ in rows), 1e-12)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<text x="4" y="16" font-size="13">{html.escape(title)}</text>',
    ]
    for i, (label, value, color) in enumerate(rows):
        y = 26 + i * (bar + gap)
        w = value / vmax * (width - ml - 60)
        parts.append(
            f'<text x="{ml - 6}" y="{y + 12}" font-size="11" text-anchor="end">{html.escape(label)}</text>'
        )
        parts.append(f'<rect x="{ml}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar}" fill="{color}"/>')
        parts.append(f'<text x="{ml + w + 4:.1f}" y="{y + 12}" font-size="11">{value:.3g}</text>')
    parts.append(f'<text x="{ml}" y="{height - 6}" font-size="11">{html.escape(xlabel)}</text></svg>')
    return "".join(parts)


def phase_share_over_time(steps: Sequence[StepRecord], bins: int = 60) -> dict[str, np.ndarray]:
    """Share of wall time in prefill (incl. mixed) and decode steps per time bin, from step records."""
    if not steps:
        return {}
    t0 = min(s.t0_ns for s in steps)
    t1 = max(s.t1_ns for s in steps)
    span = max(t1 - t0, 1)
    edges = np.linspace(t0, t1, bins + 1)
    width = span / bins
    share = {"prefill": np.zeros(bins), "decode": np.zeros(bins)}
    gpus = max(1, len({s.gpu_uuid for s in steps}))
    for s in steps:
        key = (
            "decode"
            if s.phase is Phase.DECODE
            else "prefill" if s.phase in (Phase.PREFILL, Phase.MIXED) else None
        )
        if key is None:
            continue
        a = int(np.clip((s.t0_ns - t0) // width, 0, bins - 1))
        b = int(np.clip((s.t1_ns - t0) // width, 0, bins - 1))
        for k in range(a, b + 1):
            overlap = min(s.t1_ns, edges[k + 1]) - max(s.t0_ns, edges[k])
            if overlap > 0:
                share[key][k] += overlap / width / gpus
    share["t_s"] = (edges[:-1] - t0) / 1e9
    return share


def phase_utilization_over_time(steps: Sequence[StepRecord], samples: Sequence[SampleRecord],
                                metric: str = "sm_active", slices: int = 8) -> dict[str, np.ndarray]:
    """The agent's per-phase attribution (``unmix``) over consecutive slices of a recorded trace: ``metric``
    while prefill runs and while decode runs, per slice end (s). Empty when the trace has no counter samples
    or a slice has too few windows ("not enough data" stays a gap, never a guess)."""
    from phaselens.agent.attribution import AttributionConfig, Attributor
    from phaselens.agent.state import GpuIdentity

    if not samples or not steps:
        return {}
    uuid = samples[0].gpu_uuid
    own = [s for s in samples if s.gpu_uuid == uuid]
    t0 = min(s.t_ns for s in own)
    t1 = max(s.t_ns for s in own)
    span = (t1 - t0) / 1e9
    if span <= 0:
        return {}
    horizon = span / slices
    attributor = Attributor(AttributionConfig(horizon_s=horizon, min_windows=10))
    gpu = GpuIdentity(uuid=uuid, index=0, name="")
    out: dict[str, list[float]] = {"t_s": [], "prefill": [], "decode": []}
    for k in range(1, slices + 1):
        now = t0 + int(k * horizon * 1e9)
        res = attributor.attribute(gpu, steps, own, now_ns=now)
        out["t_s"].append((now - t0) / 1e9)
        for phase, key in ((Phase.PREFILL, "prefill"), (Phase.DECODE, "decode")):
            pv = res.phases.get(phase)
            out[key].append(pv.values.get(metric, math.nan) if pv is not None else math.nan)
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def _cdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values[np.isfinite(values)])
    if not len(v):
        return np.array([]), np.array([])
    return v * 1e3, np.arange(1, len(v) + 1) / len(v)


def render_html(advice: Advice, steps: Sequence[StepRecord] = (),
                samples: Sequence[SampleRecord] = ()) -> str:
    """A self-contained HTML report (inline SVG plots)."""
    data = to_dict(advice)
    esc = html.escape
    sections: list[str] = []
    cl = advice.cluster
    sections.append(f"<h1>phaselens advise: {esc(advice.verdict.upper())}</h1>")
    sections.append(
        f"<p><b>{esc(cl.model.name)}</b> on {cl.gpus} x {esc(cl.gpu.name)}; {esc(advice.slo.describe())}."
        f" Gain {advice.gain:+.1%} against a margin of {advice.margin:.1%}.</p>"
    )
    sections.append(f"<p><b>Rule.</b> {esc(advice.rule)}</p>")
    if advice.rejections:
        items = "".join(f"<li>not recommended: {esc(r)}</li>" for r in advice.rejections)
        sections.append(f"<ul>{items}</ul>")
    rows = "".join(
        f"<tr><td>{'&#9888;' if r.triggered else ''}</td><td>{esc(r.code)}</td><td>{r.value:.3g}</td>"
        f"<td>{r.threshold:.3g}</td><td>{esc(r.text)}</td></tr>"
        for r in advice.reasons
    )
    sections.append(
        "<h2>Reasons (computed)</h2><table><tr><th></th><th>reason</th><th>value</th><th>threshold</th>"
        f"<th>detail</th></tr>{rows}</table>"
    )
    share = phase_share_over_time(steps)
    if share:
        sections.append(
            _svg_lines(
                [
                    ("prefill (incl. mixed)", "#d62728", share["t_s"], share["prefill"]),
                    ("decode", "#1f77b4", share["t_s"], share["decode"]),
                ],
                "GPU time share by phase over time (from step records)",
                "time (s)",
                "share",
            )
        )
    try:
        util = phase_utilization_over_time(steps, samples)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:  # report, never crash
        util = {}
        sections.append(f"<p>Agent attribution over time unavailable: {esc(str(exc))}</p>")
    if util and np.isfinite(util["prefill"]).any() and np.isfinite(util["decode"]).any():
        sections.append(
            _svg_lines(
                [("prefill", "#d62728", util["t_s"], util["prefill"]),
                 ("decode", "#1f77b4", util["t_s"], util["decode"])],
                "SM active while each phase runs (agent attribution, unmix)", "time (s)", "sm_active"))
    elif samples:
        sections.append("<p>Agent attribution over time: not enough counter windows per slice.</p>")
    bars = []
    for c in advice.screen_candidates[:40]:
        color = {"colocated": "#7f7f7f", "split": "#2ca02c", "conditional": "#ff7f0e"}[c.placement.kind]
        bars.append((c.placement.label, c.per_gpu, color))
    bars.sort(key=lambda r: -r[1])
    sections.append(
        _svg_bars(bars[:30], "Goodput per GPU of screened placements (closed form)", "req/s per GPU")
    )
    series = []
    colors = {"colocated": "#7f7f7f", "split": "#2ca02c", "conditional": "#ff7f0e"}
    for kind, fin in (
        ("colocated", advice.colocated),
        ("split", advice.split),
        ("conditional", advice.conditional),
    ):
        if fin is not None and fin.result is not None:
            x, y = _cdf(fin.result.ttft)
            series.append((f"{kind} TTFT", colors[kind], x, y))
    sections.append(
        _svg_lines(series, "Simulated TTFT at each finalist's goodput (CDF)", "ms", "share of requests")
    )
    series = []
    for kind, fin in (
        ("colocated", advice.colocated),
        ("split", advice.split),
        ("conditional", advice.conditional),
    ):
        if fin is not None and fin.result is not None:
            x, y = _cdf(fin.result.tpot)
            series.append((f"{kind} TPOT", colors[kind], x, y))
    sections.append(
        _svg_lines(series, "Simulated TPOT at each finalist's goodput (CDF)", "ms", "share of requests")
    )
    cost_rows = "".join(
        f"<tr><td>{esc(k)}</td><td>{v if v is not None else '-'}</td>"
        f"<td>{'-' if v is None else f'${v * cl.price_per_gpu_hour * 24 * 365:,.0f}'}</td></tr>"
        for k, v in advice.gpus_needed.items()
    )
    saving = (
        "" if advice.yearly_saving is None else f"<p>Yearly saving: <b>${advice.yearly_saving:,.0f}</b></p>"
    )
    sections.append(
        f"<h2>Cost at {advice.workload.rate:.3g} req/s</h2><table><tr><th>mode</th><th>GPUs needed</th>"
        f"<th>per year at ${cl.price_per_gpu_hour:g}/GPU-hour</th></tr>{cost_rows}</table>{saving}"
    )
    sections.append(f"<h2>Inputs and model</h2><pre>{esc(json.dumps(data['inputs'], indent=2))}</pre>")
    sections.append(f"<h2>Finalists</h2><pre>{esc(json.dumps(data['finalists'], indent=2))}</pre>")
    if advice.notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in advice.notes) + "</ul>")
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;vertical-align:top}pre{font-size:11px;"
        "background:#f6f6f6;padding:8px;overflow:auto}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>phaselens "
        f"advise</title><style>{style}</style>"
        f"</head><body>{''.join(sections)}</body></html>"
    )


def write_html(advice: Advice, path: str | Path, steps: Sequence[StepRecord] = (),
               samples: Sequence[SampleRecord] = ()) -> Path:
    path = Path(path)
    path.write_text(render_html(advice, steps, samples), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- metrics


def export_metrics(advice: Advice, registry: Any) -> None:
    """Set the advisor's headline figures as ``phaselens_advisor_*`` gauges (names from the catalogue)."""
    from phaselens.exporters import catalogue

    gain = catalogue.create(catalogue.metric("phaselens_advisor_goodput_gain_ratio"), registry=registry)
    gpus = catalogue.create(catalogue.metric("phaselens_advisor_recommended_gpus"), registry=registry)
    model = advice.cluster.model.name
    gain.labels(model_name=model).set(advice.gain if math.isfinite(advice.gain) else 0.0)
    rec: Finalist | None = advice.recommended
    if rec is not None:
        for pool, n in rec.placement.pools().items():
            gpus.labels(model_name=model, pool=pool).set(n)


def metrics_text(advice: Advice) -> str:
    """The advisor's metrics in the Prometheus text format (for a node-exporter textfile or a push)."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    export_metrics(advice, reg)
    return generate_latest(reg).decode()
