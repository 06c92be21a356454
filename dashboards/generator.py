"""Dashboard generation: load ``*.dashboard.py`` sources, render deterministic JSON, check staleness.

Also walks generated dashboards for their PromQL (``panel_queries``) and expands Grafana's variables
(``expand``), which the integration test and ``phaselens dashboards preview`` use to run the queries
against a real Prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafanalib._gen import DashboardEncoder

#: Where the sources and the generated JSON live (the package folder).
DASHBOARD_DIR = Path(__file__).resolve().parent
SUFFIX = ".dashboard.py"


@dataclass(frozen=True)
class PanelQuery:
    """One target of one panel of one dashboard."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    description: str


class DashboardGenerator:
    """Renders every ``*.dashboard.py`` in ``source_dir`` to ``<name>.json``."""

    def __init__(self, source_dir: Path = DASHBOARD_DIR):
        self.source_dir = source_dir

    def sources(self) -> list[Path]:
        return sorted(self.source_dir.glob("*" + SUFFIX))

    @staticmethod
    def json_name(source: Path) -> str:
        return source.name[: -len(SUFFIX)] + ".json"

    @staticmethod
    def render(source: Path) -> str:
        """The JSON text of one source's ``dashboard`` (sorted keys, stable ids: byte-identical reruns)."""
        module_name = f"phaselens_dashboard_{source.name[: -len(SUFFIX)]}"
        spec = importlib.util.spec_from_file_location(module_name, source)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load dashboard source {source}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        board = getattr(module, "dashboard", None)
        if board is None:
            raise ValueError(f"{source} defines no variable named 'dashboard'")
        return json.dumps(board.to_json_data(), sort_keys=True, indent=2, cls=DashboardEncoder) + "\n"

    def generate(self, out_dir: Path | None = None) -> list[Path]:
        """Write every dashboard's JSON; returns the files written."""
        out_dir = out_dir or self.source_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for source in self.sources():
            path = out_dir / self.json_name(source)
            path.write_text(self.render(source))
            written.append(path)
        return written

    def stale(self) -> list[str]:
        """Names of committed JSON files that differ from what their source renders (or are missing)."""
        out = []
        for source in self.sources():
            path = self.source_dir / self.json_name(source)
            if not path.exists() or path.read_text() != self.render(source):
                out.append(path.name)
        return out


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """The generated dashboards: file name -> parsed JSON."""
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def panel_queries(name: str, board: dict[str, Any]) -> list[PanelQuery]:
    """Every PromQL target of every panel (rows included)."""
    return [PanelQuery(name, p.get("title", ""), t.get("refId", ""), t["expr"], p.get("description") or "")
            for p in _panels(board.get("panels", [])) for t in p.get("targets", []) if t.get("expr")]


_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def expand(expr: str, values: dict[str, str] | None = None, rate_interval: str = "1m") -> str:
    """Replace Grafana variables: template variables by ``values`` (default: All = ``.*``),
    ``$__rate_interval``/``$__interval`` by ``rate_interval``. An unknown ``$__`` variable is an error."""
    values = values or {}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in ("__rate_interval", "__interval"):
            return rate_interval
        if name.startswith("__"):
            raise ValueError(f"unsupported Grafana variable ${name} in {expr!r}")
        return values.get(name, ".*")

    return _VAR.sub(sub, expr)
