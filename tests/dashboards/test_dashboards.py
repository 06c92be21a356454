"""Dashboards: committed JSON is fresh and deterministic; every query names known metrics and variables."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from click.testing import CliRunner

from phaselens.cli import cli
from phaselens.dashboards.generator import DashboardGenerator, expand, load_dashboards, panel_queries
from phaselens.exporters import catalogue

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "phaselens-rules.yaml"
EXPECTED = {"phase_split.json", "serving.json", "fleet.json", "agent_health.json"}


def test_committed_json_is_not_stale() -> None:
    stale = DashboardGenerator().stale()
    assert not stale, f"stale dashboard JSON {stale}: run `phaselens dashboards generate` and commit"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    gen = DashboardGenerator()
    first = {p.name: p.read_text() for p in gen.generate(tmp_path / "a")}
    second = {p.name: p.read_text() for p in gen.generate(tmp_path / "b")}
    assert first == second and set(first) == EXPECTED


def test_variables_uids_and_panel_ids() -> None:
    boards = load_dashboards()
    assert set(boards) == EXPECTED
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids)
    for name, board in boards.items():
        names = [v["name"] for v in board["templating"]["list"]]
        assert names == ["datasource", "hostname", "gpu", "model_name"], name
        ids = [p["id"] for p in board["panels"]]
        assert len(set(ids)) == len(ids) and all(ids), name
        for panel in board["panels"]:
            assert panel["targets"], (name, panel["title"])
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def test_every_query_names_catalogue_metrics_or_recording_rules() -> None:
    samples = {s for m in catalogue.METRICS for s in m.sample_names}
    recorded = _recorded()
    for name, board in load_dashboards().items():
        for q in panel_queries(name, board):
            bare = re.sub(r'"[^"]*"', '""', q.expr)  # label values are not metric names
            names = set(re.findall(r"\b(phaselens[a-z0-9_:]*)", bare))
            assert names or bare.startswith("up{"), q
            for n in names:
                assert n in samples or n in recorded, f"{name} / {q.panel}: unknown metric {n}"


def test_every_metric_with_a_meaning_for_operators_is_on_a_dashboard() -> None:
    exprs = " ".join(q.expr for name, b in load_dashboards().items() for q in panel_queries(name, b))
    rules = RULES.read_text()
    # Agent and engine metrics: on a dashboard or aggregated by a rule; the advisor's are written by
    # `phaselens advise` and belong to its report.
    missing = [m.name for m in catalogue.METRICS if m.producer != "advisor"
               and not re.search(rf"\b{m.name}(_bucket)?\b", exprs) and m.name not in rules]
    # On no dashboard yet: listed, not hidden (engine event counters that exist only after their first
    # event, so a panel of them would be empty on a healthy engine).
    allowed = {"phaselens_engine_prefix_cache_hit_tokens_total",
               "phaselens_engine_prefix_cache_query_tokens_total",
               "phaselens_engine_preemptions_total",
               "phaselens_engine_requests_rejected_total",
               # split mode only, after its first transfer; the KV transfer panel plots the time
               "phaselens_engine_kv_transfer_bytes_total"}
    assert set(missing) <= allowed, sorted(set(missing) - allowed)


def test_expand_variables() -> None:
    expr = 'rate(x{hostname=~"$hostname", gpu=~"${gpu}"}[$__rate_interval])'
    assert expand(expr, {"hostname": "n1"}, "30s") == 'rate(x{hostname=~"n1", gpu=~".*"}[30s])'


def test_cli_generate_check_and_preview_errors() -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["dashboards", "generate", "--check"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["dashboards", "preview", "--range", "soon"])
    assert bad.exit_code == 2 and "'soon' is not a positive duration" in bad.output
    bad_url = runner.invoke(cli, ["dashboards", "preview", "--prometheus", "localhost:9090"])
    assert bad_url.exit_code == 2 and "'localhost:9090' is not an http(s) URL" in bad_url.output
    # A port nobody listens on: a clear error, exit 1, no traceback.
    down = runner.invoke(cli, ["dashboards", "preview", "--prometheus", "http://127.0.0.1:9"])
    assert down.exit_code == 1 and "cannot reach Prometheus at http://127.0.0.1:9" in down.output
    assert "Traceback" not in down.output
