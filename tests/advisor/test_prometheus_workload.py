"""The workload from a real Prometheus server: series backfilled with promtool, read with query_range."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from phaselens.advisor.workload import Workload

from tests.engine.server_harness import free_port, running_process

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="the prometheus/promtool binaries are not installed: run `bash deploy/install-test-deps.sh`")

RATE, PROMPT, OUTPUT = 2.5, 900, 150


def _openmetrics(start: int, end: int) -> str:
    """Counters as the engine and the agent export them, growing at RATE requests/s."""
    lines = ["# TYPE phaselens_engine_time_to_first_token_seconds_count unknown",
             "# TYPE phaselens_phase_tokens_total unknown"]
    for t in range(start, end, 15):
        n = (t - start) * RATE
        lines.append(f'phaselens_engine_time_to_first_token_seconds_count{{role="colocated"}} {n} {t}')
    for t in range(start, end, 15):
        n = (t - start) * RATE
        lines.append(f'phaselens_phase_tokens_total{{kind="prefill",phase="prefill"}} {n * PROMPT} {t}')
        lines.append(f'phaselens_phase_tokens_total{{kind="decode",phase="decode"}} {n * OUTPUT} {t}')
    return "\n".join(lines) + "\n# EOF\n"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("prom")
    end = int(time.time()) - 3600
    start = end - 3 * 3600
    (tmp / "data.om").write_text(_openmetrics(start, end))
    data = tmp / "tsdb"
    res = subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(tmp / "data.om"),
                          str(data)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    (tmp / "prometheus.yml").write_text("global:\n  scrape_interval: 15s\n")
    port = free_port()
    cmd = ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
           "--storage.tsdb.retention.time=30d", f"--web.listen-address=127.0.0.1:{port}"]
    url = f"http://127.0.0.1:{port}"
    with running_process(cmd, f"{url}/-/ready", "prometheus", timeout_s=60):
        yield url, start, end


def test_workload_from_prometheus_range(prometheus):
    url, start, end = prometheus
    wl = Workload.from_prometheus(url, start + 600, end - 60)
    assert wl.rate == pytest.approx(RATE, rel=0.02)
    assert wl.prompt_tokens.mean() == pytest.approx(PROMPT, rel=0.1)
    assert wl.output_tokens.mean() == pytest.approx(OUTPUT, rel=0.1)
    assert wl.source == f"prometheus {url}"


def test_range_without_data_is_a_clear_error(prometheus):
    from phaselens.advisor.workload import WorkloadError

    url, start, _ = prometheus
    with pytest.raises(WorkloadError, match="no data|no requests"):
        Workload.from_prometheus(url, start - 7 * 86400, start - 6 * 86400)
