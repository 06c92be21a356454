"""NVML errors at random while the agent collects: timeouts, a GPU lost, a field not supported.

The agent must neither stop nor lose the healthy GPU's data, and every failed poll must show in the health
metrics (``phaselens_sampler_errors_total``, ``phaselens_sampler_success``) and in ``/health``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from phaselens.agent.daemon import AgentConfig, build_daemon, health
from tests.agent.fake_nvml import FakeGpu
from tests.faults.faulty_nvml import FaultyNvml
from tests.faults.helpers import scrape, value

POLLS = 300
LOSE_AT = 120
UNSUPPORT_AT = 200


def _wrap_polls(daemon: Any, fake: FaultyNvml, lost: FakeGpu, faulty_polls: dict[str, int],
                samples: dict[str, dict[str, int]]) -> None:
    """Count, per sampler, the polls during which the fake injected a fault (a timeout, a lost GPU, a field
    found not supported)."""
    for sch in daemon.samplers:
        inner = sch.sampler.sample
        name = sch.sampler.name

        def poll(inner: Any = inner, name: str = name, sampler: Any = sch.sampler) -> list:
            before = fake.timeouts
            skipped = sum(len(g.unsupported) for g in sampler.gpus)
            got = inner()
            newly_unsupported = sum(len(g.unsupported) for g in sampler.gpus) > skipped
            if fake.timeouts > before or lost.lost or newly_unsupported:
                faulty_polls[name] += 1
            for rec in got:
                samples[name][rec.gpu_uuid] = samples[name].get(rec.gpu_uuid, 0) + 1
            return got

        sch.sampler.sample = poll


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_nvml_errors_never_stop_the_agent_and_every_one_is_counted(seed: int, caplog) -> None:
    healthy = FakeGpu("GPU-healthy", refresh_polls=2, unsupported={"power"})
    doomed = FakeGpu("GPU-doomed", refresh_polls=2)
    fake = FaultyNvml([healthy, doomed], seed=seed, timeout_rate=0.05)
    daemon = build_daemon(AgentConfig(source="gpm", hostname="node-f", horizon_s=10,
                                      attribute_interval_s=0.5), nvml=fake, with_receiver=False)
    assert {s.sampler.name for s in daemon.samplers} == {"gpm", "nvml"}
    faulty_polls = {"gpm": 0, "nvml": 0}
    samples: dict[str, dict[str, int]] = {"gpm": {}, "nvml": {}}
    _wrap_polls(daemon, fake, doomed, faulty_polls, samples)
    fake.armed = True
    caplog.set_level(logging.WARNING)
    now = 1_700_000_000_000_000_000
    for i in range(POLLS):
        if i == LOSE_AT:
            fake.lose(doomed)
        if i == UNSUPPORT_AT:
            healthy.unsupported.add(fake.NVML_GPM_METRIC_FP16_UTIL)  # GPM FP16 starts answering NotSupported
        for sch in daemon.samplers:
            sch.next_ns = 0  # every sampler polls every tick: the test counts polls, not time
            # ... and every GPU in it: the GPM sampler plans each GPU on its own refresh phase, read from the
            # real clock, so with this fake tick time it would skip GPUs at random (and a lost GPU it did not
            # poll would count as a faulty poll here but not in the agent)
            getattr(sch.sampler, "_due", {}).clear()
        daemon.tick(now)  # must not raise, whatever NVML does
        now += 10_000_000
    assert fake.timeouts > 10  # the faults really happened

    metrics = scrape(daemon.state)
    for name in ("gpm", "nvml"):
        # exactly one failed poll counted per poll that met an injected fault
        assert value(metrics, "phaselens_sampler_errors_total", sampler=name) == faulty_polls[name] > 0
        # the GPU stays lost: the sampler reports failure until it is back
        assert value(metrics, "phaselens_sampler_success", sampler=name) == 0
    assert value(metrics, "phaselens_agent_samplers_failed") == 2
    # the healthy GPU kept being read after the other was lost (its data is not lost with it)
    assert samples["nvml"]["GPU-healthy"] > POLLS - LOSE_AT
    assert samples["gpm"]["GPU-healthy"] > (POLLS - LOSE_AT) // 2
    assert samples["nvml"]["GPU-doomed"] <= LOSE_AT
    assert value(metrics, "phaselens_gpu_sm_clock_hertz", gpu_uuid="GPU-healthy") == 1755e6
    # the lost GPU's last readings are not exported as if it still ran
    assert not [k for k in metrics
                if k[0].startswith("phaselens_gpu_") and ("gpu_uuid", "GPU-doomed") in k[1]]
    # the unsupported field is logged once (not once per poll) and skipped
    power_logs = [r for r in caplog.records if "power_w on GPU-healthy" in r.getMessage()]
    assert len(power_logs) == 1
    assert not [k for k in metrics
                if k[0] == "phaselens_gpu_power_watts" and ("gpu_uuid", "GPU-healthy") in k[1]]
    fp16_logs = [r for r in caplog.records if "fp16_active on GPU-healthy" in r.getMessage()]
    assert len(fp16_logs) == 1
    # the loss is logged once per sampler and named in /health
    lost_logs = [r for r in caplog.records if "lost GPU GPU-doomed" in r.getMessage()]
    assert len(lost_logs) == 2 and all(r.levelno == logging.ERROR for r in lost_logs)
    daemon.state.mark_started()
    code, body = health(daemon.state)
    assert code == 503 and body["status"] == "degraded"
    assert "GPU-doomed" in body["samplers"]["nvml"]["error"]
    assert body["sampler_errors"] == faulty_polls
    daemon.close()


def test_a_transient_timeout_fails_one_poll_only() -> None:
    gpu = FakeGpu("GPU-t", refresh_polls=1)
    fake = FaultyNvml([gpu], seed=0, timeout_rate=1.0)
    daemon = build_daemon(AgentConfig(source="nvml", hostname="node-f"), nvml=fake, with_receiver=False)
    fake.armed = True
    daemon.tick(1_000)
    snap = daemon.state.snapshot()
    assert not snap.samplers["nvml"].success and "NVML error 10" in snap.samplers["nvml"].last_error
    fake.timeout_rate = 0.0  # NVML answers again
    daemon.samplers[0].next_ns = 0
    daemon.tick(2_000)
    metrics = scrape(daemon.state)
    assert value(metrics, "phaselens_sampler_success", sampler="nvml") == 1
    assert value(metrics, "phaselens_sampler_errors_total", sampler="nvml") == 1
    daemon.close()
