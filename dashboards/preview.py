"""A PNG of the "Phase split" main panel, drawn with matplotlib from a Prometheus' data.

For people without a Grafana at hand: the same PromQL as the dashboard's main panel (prefill vs decode
tensor and DRAM activity), over a range, one line per (phase, metric).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phaselens.dashboards.generator import expand, load_dashboards

MAIN_PANEL = "Prefill vs decode: tensor and DRAM activity"
DASHBOARD_FILE = "phase_split.json"

# Prefill solid, decode dashed; tensor blue, DRAM orange (the same reading in grey-scale print).
_STYLE = {"prefill": "-", "decode": "--", "mixed": ":", "idle": "-."}
_COLOR = {"tensor_active": "tab:blue", "dram_active": "tab:orange", "sm_active": "tab:green"}


class PrometheusQueryError(RuntimeError):
    """Prometheus could not be reached or refused the query; the message says which and why."""


@dataclass
class Series:
    labels: dict[str, str]
    t: list[float]
    v: list[float]


class PhaseSplitPreview:
    """Queries the main panel's PromQL over ``[end - range_s, end]`` and draws it."""

    def __init__(self, prometheus_url: str, values: dict[str, str] | None = None, timeout_s: float = 10.0):
        self.url = prometheus_url.rstrip("/")
        self.values = values or {}
        self.timeout_s = timeout_s

    def query(self) -> str:
        board = load_dashboards()[DASHBOARD_FILE]
        for panel in board["panels"]:
            if panel["title"] == MAIN_PANEL:
                return expand(panel["targets"][0]["expr"], self.values)
        raise LookupError(f"panel {MAIN_PANEL!r} not found in {DASHBOARD_FILE}")

    def fetch(self, range_s: float, step_s: float, end: float | None = None) -> list[Series]:
        end = time.time() if end is None else end
        params = urllib.parse.urlencode({"query": self.query(), "start": end - range_s, "end": end,
                                         "step": step_s})
        try:
            url = f"{self.url}/api/v1/query_range?{params}"
            with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
                body: dict[str, Any] = json.load(r)
        except urllib.error.HTTPError as exc:
            raise PrometheusQueryError(f"Prometheus at {self.url} refused the query: HTTP {exc.code} "
                                       f"{exc.read().decode(errors='replace')[:300]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise PrometheusQueryError(f"cannot reach Prometheus at {self.url}: {exc}") from None
        if body.get("status") != "success":
            raise PrometheusQueryError(f"Prometheus at {self.url}: {body.get('error', body)}")
        out = []
        for item in body["data"]["result"]:
            pts = [(float(t), float(v)) for t, v in item["values"] if math.isfinite(float(v))]
            if pts:
                out.append(Series(item["metric"], [p[0] for p in pts], [p[1] for p in pts]))
        return out

    def render(self, out: Path, range_s: float = 3600.0, step_s: float | None = None) -> int:
        """Draw the panel into ``out`` (PNG); returns the number of series drawn.

        Raises :class:`PrometheusQueryError` when Prometheus fails and ``LookupError`` when the query
        returns no data in the range (no empty picture)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
        from datetime import datetime, timezone

        step = step_s or max(1.0, range_s / 600)
        series = self.fetch(range_s, step)
        if not series:
            raise LookupError(f"no data for {self.query()!r} in the last {range_s:g} s")
        fig, ax = plt.subplots(figsize=(12, 4.5), dpi=100)
        for s in sorted(series, key=lambda s: (s.labels.get("phase", ""), s.labels.get("metric", ""))):
            phase, metric = s.labels.get("phase", "?"), s.labels.get("metric", "?")
            ax.plot(mdates.date2num([datetime.fromtimestamp(t, tz=timezone.utc) for t in s.t]), s.v,
                    linestyle=_STYLE.get(phase, "-"), color=_COLOR.get(metric), label=f"{phase} {metric}")
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
        ax.set_xlabel("time (UTC)")
        ax.set_title(f"phaselens / Phase split: {MAIN_PANEL}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        plt.close(fig)
        return len(series)
