"""Trace records (DESIGN.md, "Trace format"): JSON Lines of ``meta``, ``step`` and ``sample`` records.

The same records travel as datagrams from the engine's shim to the agent, are written by
``phaselens record`` and read by ``phaselens attribute``. Parsing is strict about what it knows and
lenient about what it does not: unknown record types and unknown keys are ignored (forward
compatibility), a malformed line raises :class:`TraceFormatError` from :func:`parse_record` and is
counted and skipped, with its line number in a warning, by :func:`read_trace`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Union

from phaselens.phase import Clock, Phase, Role

log = logging.getLogger(__name__)

TRACE_VERSION = 1

#: Canonical sample keys; utilizations are ratios 0..1 (DESIGN.md).
UTILIZATION_KEYS = (
    "gpu_util",
    "mem_util",
    "sm_active",
    "sm_occupancy",
    "tensor_active",
    "dram_active",
    "fp16_active",
)
METRIC_KEYS = UTILIZATION_KEYS + ("power_w", "sm_clock_hz", "mem_used_bytes")

#: Sample sources. Counter sources report deltas since their previous poll.
SOURCES = ("gpm", "nvml", "dcgm", "simulated", "replay")
COUNTER_SOURCES = ("gpm", "dcgm", "simulated")

_MAX_ID_LEN = 128


class TraceFormatError(ValueError):
    """A record that cannot be understood; the message says which field and why."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU in a ``meta`` record."""

    uuid: str
    index: int
    name: str
    peak_bf16_flops: float | None = None
    peak_dram_bytes_per_s: float | None = None


@dataclass(frozen=True)
class MetaRecord:
    """Trace header: host and GPUs."""

    host: str
    gpus: tuple[GpuInfo, ...] = ()
    version: int = TRACE_VERSION
    type: str = field(default="meta", init=False)


@dataclass(frozen=True)
class StepRecord:
    """One engine step on one GPU: its phase, its GPU execution interval and its analytic cost."""

    gpu_uuid: str
    engine_id: str
    role: Role
    phase: Phase
    step: int
    t0_ns: int
    t1_ns: int
    clock: Clock
    prefill_tokens: int
    decode_tokens: int
    batch: int
    context_tokens: int
    flops: float
    bytes: float
    type: str = field(default="step", init=False)

    @property
    def duration_s(self) -> float:
        return (self.t1_ns - self.t0_ns) / 1e9


@dataclass(frozen=True)
class SampleRecord:
    """What one poll of one source read. Counter sources hold deltas; ``None`` = not updated."""

    gpu_uuid: str
    source: str
    t_ns: int
    values: dict[str, float | None]
    type: str = field(default="sample", init=False)


Record = Union[MetaRecord, StepRecord, SampleRecord]


# ---------------------------------------------------------------- parsing


def _get(obj: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise TraceFormatError(f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a JSON true is never a valid number here.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TraceFormatError(f"field {key!r} has type {type(value).__name__}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _ident(obj: dict[str, Any], key: str) -> str:
    value = _get(obj, key, str)
    if not value or len(value) > _MAX_ID_LEN:
        raise TraceFormatError(f"field {key!r} must be 1..{_MAX_ID_LEN} characters")
    return value


#: bound of a count (tokens, batch, step number): the largest integer a float64 holds exactly, so every
#: count stays exact in the arithmetic and the exposition downstream (a JSON integer has no bound of its own)
MAX_COUNT = 2**53
#: bound of a nanosecond timestamp: a signed 64-bit integer, as time.time_ns() and NVML give them
MAX_TIME_NS = 2**63 - 1


def _count(obj: dict[str, Any], key: str, limit: int = MAX_COUNT) -> int:
    value = _get(obj, key, int)
    if value < 0:
        raise TraceFormatError(f"field {key!r} is negative ({value})")
    if value > limit:
        raise TraceFormatError(f"field {key!r} is over {limit} ({str(value)[:20]}...)")
    return value


def _amount(obj: dict[str, Any], key: str) -> float:
    value = float(_get(obj, key, (int, float)))
    if not math.isfinite(value) or value < 0:
        raise TraceFormatError(f"field {key!r} must be a finite number >= 0, got {value}")
    return value


def _enum(obj: dict[str, Any], key: str, enum_type: Any) -> Any:
    value = _get(obj, key, str)
    try:
        return enum_type.parse(value) if hasattr(enum_type, "parse") else enum_type(value)
    except ValueError as exc:
        raise TraceFormatError(f"field {key!r}: {exc}") from None


def _parse_meta(obj: dict[str, Any]) -> MetaRecord:
    gpus_raw = obj.get("gpus", [])
    if not isinstance(gpus_raw, list):
        raise TraceFormatError("field 'gpus' must be a list")
    gpus = []
    for g in gpus_raw:
        if not isinstance(g, dict):
            raise TraceFormatError("each entry of 'gpus' must be an object")
        peak_f = g.get("peak_bf16_flops")
        peak_b = g.get("peak_dram_bytes_per_s")
        gpus.append(
            GpuInfo(
                uuid=_ident(g, "uuid"),
                index=_count(g, "index"),
                name=_get(g, "name", str),
                peak_bf16_flops=_amount(g, "peak_bf16_flops") if peak_f is not None else None,
                peak_dram_bytes_per_s=_amount(g, "peak_dram_bytes_per_s") if peak_b is not None else None,
            )
        )
    version = obj.get("version", TRACE_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise TraceFormatError("field 'version' must be an integer")
    return MetaRecord(host=str(obj.get("host", "")), gpus=tuple(gpus), version=version)


def _parse_step(obj: dict[str, Any]) -> StepRecord:
    clock_raw = _get(obj, "clock", str)
    try:
        clock = Clock(clock_raw)
    except ValueError:
        raise TraceFormatError(f"field 'clock': unknown clock {clock_raw!r}; expected gpu or host") from None
    rec = StepRecord(
        gpu_uuid=_ident(obj, "gpu_uuid"),
        engine_id=_ident(obj, "engine_id"),
        role=_enum(obj, "role", Role),
        phase=_enum(obj, "phase", Phase),
        step=_count(obj, "step"),
        t0_ns=_count(obj, "t0_ns", MAX_TIME_NS),
        t1_ns=_count(obj, "t1_ns", MAX_TIME_NS),
        clock=clock,
        prefill_tokens=_count(obj, "prefill_tokens"),
        decode_tokens=_count(obj, "decode_tokens"),
        batch=_count(obj, "batch"),
        context_tokens=_count(obj, "context_tokens"),
        flops=_amount(obj, "flops"),
        bytes=_amount(obj, "bytes"),
    )
    if rec.t1_ns < rec.t0_ns:
        raise TraceFormatError(f"step ends before it starts (t0_ns={rec.t0_ns}, t1_ns={rec.t1_ns})")
    if rec.phase is Phase.IDLE:
        # idle is what is left between steps (DESIGN.md "Phases"): a step always runs something
        raise TraceFormatError("field 'phase': a step is prefill, decode or mixed, never idle")
    return rec


def _parse_sample(obj: dict[str, Any]) -> SampleRecord:
    values_raw = _get(obj, "values", dict)
    values: dict[str, float | None] = {}
    for key, value in values_raw.items():
        if key not in METRIC_KEYS:
            continue  # unknown keys are ignored (forward compatibility)
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TraceFormatError(f"sample value {key!r} must be a finite number or null, got {value!r}")
        values[key] = float(value)
    source = _get(obj, "source", str)
    if source not in SOURCES:
        raise TraceFormatError(f"field 'source': unknown source {source!r}; "
                               f"expected one of {', '.join(SOURCES)}")
    return SampleRecord(gpu_uuid=_ident(obj, "gpu_uuid"), source=source,
                        t_ns=_count(obj, "t_ns", MAX_TIME_NS), values=values)


_PARSERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    "meta": _parse_meta, "step": _parse_step, "sample": _parse_sample}


def parse_record(obj: Any) -> Record | None:
    """Turn one decoded JSON object into a record; ``None`` for an unknown record type.

    Raises :class:`TraceFormatError` for anything malformed.
    """
    if not isinstance(obj, dict):
        raise TraceFormatError(f"a record must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise TraceFormatError("missing or non-string field 'type'")
    parser = _PARSERS.get(kind)
    return parser(obj) if parser else None


def parse_line(line: str | bytes) -> Record | None:
    """Parse one JSON line (or datagram payload); see :func:`parse_record`."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceFormatError(f"not valid JSON: {exc}") from None
    except RecursionError:  # '[[[[...' thousands deep: json recurses per level
        raise TraceFormatError("not valid JSON: nested too deeply") from None
    try:
        return parse_record(obj)
    except OverflowError:  # an integer too large for a float (t_ns, flops, ...)
        raise TraceFormatError("a number is out of range") from None


# ---------------------------------------------------------------- serializing


def record_to_dict(rec: Record) -> dict[str, Any]:
    """The JSON object for a record, keys in DESIGN.md's order."""
    if isinstance(rec, MetaRecord):
        return {
            "type": "meta",
            "version": rec.version,
            "host": rec.host,
            "gpus": [
                {k: v for k, v in g.__dict__.items() if v is not None or k in ("uuid", "index", "name")}
                for g in rec.gpus
            ],
        }
    if isinstance(rec, StepRecord):
        return {
            "type": "step",
            "gpu_uuid": rec.gpu_uuid,
            "engine_id": rec.engine_id,
            "role": rec.role.value,
            "phase": rec.phase.value,
            "step": rec.step,
            "t0_ns": rec.t0_ns,
            "t1_ns": rec.t1_ns,
            "clock": rec.clock.value,
            "prefill_tokens": rec.prefill_tokens,
            "decode_tokens": rec.decode_tokens,
            "batch": rec.batch,
            "context_tokens": rec.context_tokens,
            "flops": rec.flops,
            "bytes": rec.bytes,
        }
    if isinstance(rec, SampleRecord):
        return {"type": "sample", "gpu_uuid": rec.gpu_uuid, "source": rec.source, "t_ns": rec.t_ns,
                "values": dict(rec.values)}
    raise TypeError(f"not a trace record: {rec!r}")


def dumps(rec: Record) -> str:
    """One compact JSON line (no newline)."""
    return json.dumps(record_to_dict(rec), separators=(",", ":"))


# ---------------------------------------------------------------- files


@dataclass
class Trace:
    """A whole trace file in memory."""

    meta: MetaRecord | None = None
    steps: list[StepRecord] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    malformed: int = 0
    unknown: int = 0

    def gpu_uuids(self) -> list[str]:
        """Every GPU UUID that appears, meta first, in first-seen order."""
        seen: dict[str, None] = {}
        if self.meta:
            for g in self.meta.gpus:
                seen[g.uuid] = None
        for uuid in [s.gpu_uuid for s in self.steps] + [s.gpu_uuid for s in self.samples]:
            seen.setdefault(uuid, None)
        return list(seen)


def iter_records(lines: Iterable[str]) -> Iterator[tuple[int, Record | None, str | None]]:
    """Yield ``(line_number, record_or_None, error_or_None)`` for each non-blank line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, parse_line(line), None
        except TraceFormatError as exc:
            yield number, None, str(exc)


def read_trace(path: str | os.PathLike[str], *, max_warnings: int = 20) -> Trace:
    """Read a JSONL trace; malformed lines are counted and skipped with a warning naming the line."""
    trace = Trace()
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, rec, error in iter_records(fh):
            if error is not None:
                trace.malformed += 1
                if trace.malformed <= max_warnings:
                    log.warning("%s:%d: skipped malformed record: %s", path, number, error)
                continue
            if rec is None:
                trace.unknown += 1
            elif isinstance(rec, MetaRecord):
                trace.meta = trace.meta or rec
            elif isinstance(rec, StepRecord):
                trace.steps.append(rec)
            else:
                trace.samples.append(rec)
    if trace.malformed > max_warnings:
        log.warning("%s: %d malformed records skipped in all", path, trace.malformed)
    trace.steps.sort(key=lambda s: (s.gpu_uuid, s.t0_ns))
    trace.samples.sort(key=lambda s: (s.gpu_uuid, s.source, s.t_ns))
    return trace


class TraceWriter:
    """Append records to a JSONL file, one line each; safe to call from several threads."""

    def __init__(self, path: str | os.PathLike[str] | IO[str]):
        self._lock = threading.Lock()
        if isinstance(path, (str, os.PathLike)):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._fh: IO[str] = open(path, "a", encoding="utf-8")
            self._owns = True
        else:
            self._fh = path
            self._owns = False

    def write(self, rec: Record) -> None:
        line = dumps(rec) + "\n"
        with self._lock:
            self._fh.write(line)

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._owns and not self._fh.closed:
                self._fh.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
