"""The router in split mode: roles change at once, standby workers get nothing, decode picks are KV-aware."""

from __future__ import annotations

import pytest

from phaselens.engine.router import NoWorkerAvailable, Router
from phaselens.phase import Role


def _router() -> Router:
    r = Router()
    for wid in ("w0", "w1", "w2"):
        r.add_worker(wid)
    return r


def test_set_roles_relabels_and_standby_workers_are_not_routed() -> None:
    r = _router()
    r.set_roles({"w0": Role.PREFILL, "w1": Role.DECODE, "w2": None})
    assert r.select("a", 10, Role.PREFILL) == "w0"
    assert r.select("b", 10, Role.DECODE) == "w1"
    with pytest.raises(NoWorkerAvailable):
        r.select("c", 10, Role.COLOCATED)
    assert r.alive_count(Role.DECODE) == 1 and r.alive_count() == 3
    r.set_roles({"w0": Role.COLOCATED, "w1": Role.COLOCATED, "w2": Role.COLOCATED})
    assert r.select("d", 10) == "w2"  # least loaded: w0 and w1 still carry a and b


def test_decode_pick_prefers_a_worker_with_room_for_the_blocks() -> None:
    r = _router()
    r.set_roles({"w0": Role.PREFILL, "w1": Role.DECODE, "w2": Role.DECODE})
    r.report_kv("w1", 3)
    r.report_kv("w2", 40)
    r.select("busy", 5, Role.DECODE)  # w1 (ties: lowest id) now carries one request
    r.release("busy")
    assert r.select("a", 100, Role.DECODE, need_blocks=10) == "w2"  # w1 has 3 blocks free
    # what was sent counts against the free blocks until the next report: w2 has 30 left
    assert r.select("b", 100, Role.DECODE, need_blocks=35) == "w1"  # none has room: the least loaded
    assert r.select("c", 100, Role.DECODE, need_blocks=2) == "w2"  # w1 is charged down to 0 free blocks
    r.assign("x", "w0", 7)
    assert r.worker_of("x") == "w0" and [w.requests for w in r.loads()][0] == 1
