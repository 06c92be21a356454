"""``phaselens advise --apply``: put a running engine into the recommended mode, then check that it took.

:func:`apply_recommendation` reads the engine's mode, changes it through the admin API when it differs,
and verifies the result (the mode and pool sizes read back, ``/health`` ok). It never raises for what the
engine answers: the :class:`ApplyResult` says what was done and why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from phaselens.engine.mode_cli import AdminClient, AdminError


@dataclass
class ApplyResult:
    """What :func:`apply_recommendation` did."""

    ok: bool
    #: False when the engine was already in the asked-for mode (or the change failed)
    changed: bool
    mode: str
    prefill: int | None
    decode: int | None
    message: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    #: the engine's error code when it refused (``invalid_mode``, ``mode_change_rolled_back``, ...)
    error_code: str | None = None
    checks: list[str] = field(default_factory=list)


def _matches(state: dict[str, Any], mode: str, prefill: int | None, decode: int | None) -> bool:
    if state.get("mode") != mode:
        return False
    if mode == "split":
        return state.get("prefill") == prefill and state.get("decode") == decode
    return True


def apply_recommendation(engine_url: str, token: str, mode: str, prefill: int | None = None,
                         decode: int | None = None, timeout_s: float = 60.0) -> ApplyResult:
    """Switch the engine at ``engine_url`` to ``mode`` (``split`` with ``prefill``/``decode`` workers, or
    ``colocated``) and verify it. ValueError for a bad ``mode``/counts or URL (before any call)."""
    if mode not in ("colocated", "split"):
        raise ValueError(f"mode must be 'colocated' or 'split', got {mode!r}")
    if mode == "split" and (prefill is None or decode is None or prefill < 1 or decode < 1):
        raise ValueError(f"split needs prefill >= 1 and decode >= 1 workers, got {prefill} and {decode}")
    if mode == "colocated":
        prefill = decode = None
    client = AdminClient(engine_url, token, timeout_s=timeout_s)
    result = ApplyResult(ok=False, changed=False, mode=mode, prefill=prefill, decode=decode, message="")
    try:
        result.before = client.get_mode()
        if _matches(result.before, mode, prefill, decode):
            result.ok, result.after = True, result.before
            result.message = f"the engine already runs {_describe(mode, prefill, decode)}; nothing changed"
            return result
        client.set_mode(mode, prefill, decode)
        result.changed = True
        result.after = client.get_mode()
        health = client.health()
    except AdminError as exc:
        result.error_code = exc.code
        result.message = f"the engine did not change mode: {exc}" if not result.changed else (
            f"the mode changed but could not be verified: {exc}")
        return result
    after = result.after
    result.checks.append(f"mode read back: {after.get('mode')} (prefill {after.get('prefill')}, "
                         f"decode {after.get('decode')})")
    result.checks.append(f"health: {health.get('status')}")
    if not _matches(result.after, mode, prefill, decode):
        result.message = (f"the engine accepted the change but reports {result.after.get('mode')} "
                          f"(prefill {result.after.get('prefill')}, decode {result.after.get('decode')})")
        return result
    if health.get("status") != "ok":
        result.message = (f"switched to {_describe(mode, prefill, decode)}, but /health says "
                          f"{health.get('status')}")
        return result
    result.ok = True
    result.message = (f"switched the engine from {result.before.get('mode')} to "
                      f"{_describe(mode, prefill, decode)}; verified")
    return result


def _describe(mode: str, prefill: int | None, decode: int | None) -> str:
    return f"split ({prefill} prefill + {decode} decode)" if mode == "split" else "colocated"
