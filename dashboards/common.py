"""Shared pieces of the phaselens dashboards: template variables, label selectors, panel builders.

Every query filters by the dashboard's variables (``$hostname``, ``$gpu``, ``$model_name``; all
multi-value with an "All" of ``.*``) and names metrics only through the catalogue, so a renamed metric
fails ``tests/dashboards`` instead of leaving an empty panel.
"""

from __future__ import annotations

from grafanalib.core import (
    Dashboard,
    GridPos,
    Stat,
    Table,
    Target,
    Template,
    Templating,
    Time,
    TimeSeries,
)

from phaselens.exporters import catalogue

#: The Prometheus datasource picked by the ``datasource`` variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Per-GPU series (the agent's).
GPU_SEL = 'hostname=~"$hostname", gpu=~"$gpu", model_name=~"$model_name"'
#: Per-engine series (no GPU label).
ENGINE_SEL = 'hostname=~"$hostname", model_name=~"$model_name"'
#: Per-agent series (host level).
HOST_SEL = 'hostname=~"$hostname"'
#: Recording-rule series (aggregated over hosts and GPUs: model only).
MODEL_SEL = 'model_name=~"$model_name"'

RATE = "$__rate_interval"

#: Tag in a panel description: the panel only has data while the engine runs in split mode.
SPLIT_MODE_ONLY = "(split mode only)"


def m(name: str) -> str:
    """A catalogue metric name (KeyError if it is not in the catalogue)."""
    return catalogue.metric(name).name


def sel(base: str, **extra: str) -> str:
    """``{base, k="v", ...}``; a value starting with ``~`` is a regex match."""
    parts = [base] if base else []
    for key, value in extra.items():
        parts.append(f'{key}=~"{value[1:]}"' if value.startswith("~") else f'{key}="{value}"')
    return "{" + ", ".join(parts) + "}"


def variables(with_gpu: bool = True) -> Templating:
    """datasource, hostname, gpu, model_name: each multi-value with All = ``.*``."""
    def var(name: str, label: str, query: str) -> Template:
        return Template(name=name, label=label, query=query, dataSource=DATASOURCE, includeAll=True,
                        multi=True, allValue=".*", default="$__all", refresh=2)

    ds = Template(name="datasource", label="Datasource", query="prometheus", type="datasource",
                  default="Prometheus")
    info = m("phaselens_agent_info")
    share = m("phaselens_phase_time_ratio")
    out = [ds, var("hostname", "Host", f"label_values({info}, hostname)")]
    if with_gpu:
        out.append(var("gpu", "GPU", f'label_values({share}{{hostname=~"$hostname"}}, gpu)'))
    out.append(var("model_name", "Model", f'label_values({share}{{hostname=~"$hostname"}}, model_name)'))
    return Templating(list=out)


def targets(queries: list[tuple[str, str]], instant: bool = False, table: bool = False) -> list[Target]:
    """Targets A, B, C, ... from (PromQL, legend) pairs."""
    return [Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i), datasource=DATASOURCE,
                   instant=instant, format="table" if table else "time_series")
            for i, (expr, legend) in enumerate(queries)]


def timeseries(title: str, queries: list[tuple[str, str]], unit: str, pos: tuple[int, int, int, int],
               description: str = "", stacked: bool = False, ratio: bool = False) -> TimeSeries:
    """A time-series panel at ``pos`` = (x, y, w, h)."""
    x, y, w, h = pos
    extra = {"fieldConfig": {"defaults": {"min": 0, "max": 1}}} if ratio else None
    return TimeSeries(title=title, description=description, dataSource=DATASOURCE, targets=targets(queries),
                      unit=unit, gridPos=GridPos(h=h, w=w, x=x, y=y), legendDisplayMode="table",
                      legendCalcs=["mean", "lastNotNull"], tooltipMode="multi",
                      stacking={"mode": "normal", "group": "A"} if stacked else {},
                      fillOpacity=30 if stacked else 0, extraJson=extra)


def table(title: str, queries: list[tuple[str, str]], unit: str, pos: tuple[int, int, int, int],
          description: str = "") -> Table:
    """A table of instant queries merged on their labels (one row per label set)."""
    x, y, w, h = pos
    return Table(title=title, description=description, dataSource=DATASOURCE,
                 targets=targets(queries, instant=True, table=True), unit=unit,
                 gridPos=GridPos(h=h, w=w, x=x, y=y), filterable=True,
                 transformations=[{"id": "merge", "options": {}},
                                  {"id": "organize", "options": {"excludeByName": {"Time": True}}}])


def stat(title: str, queries: list[tuple[str, str]], unit: str, pos: tuple[int, int, int, int],
         description: str = "") -> Stat:
    x, y, w, h = pos
    return Stat(title=title, description=description, dataSource=DATASOURCE, targets=targets(queries),
                format=unit, gridPos=GridPos(h=h, w=w, x=x, y=y), reduceCalc="lastNotNull")


def dashboard(title: str, uid: str, description: str, panels: list, with_gpu: bool = True) -> Dashboard:
    """A dashboard with the standard variables, 6 h default window and stable panel ids."""
    return Dashboard(title=title, uid=uid, description=description, tags=["phaselens"], panels=panels,
                     templating=variables(with_gpu), time=Time("now-6h", "now"), refresh="30s",
                     timezone="browser", schemaVersion=36).auto_panel_ids()
