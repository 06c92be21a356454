"""The request log: one JSON line per finished request, the workload record the advisor reads.

Format (docs/contracts.md, "Request log"): ``type`` ``"request"``, wall-clock ns times (``arrival_ns`` when
the front-end received the HTTP request, ``first_token_ns``, ``finish_ns``), token counts (``prompt_tokens``,
``cached_tokens``, ``output_tokens``), ``worker``, ``role``, ``status`` (``ok`` | ``error`` | ``aborted``),
``finish_reason`` and ``session_id``. Each line is written and flushed whole, so a reader never sees half a
record and a crash loses at most the request in flight.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

STATUSES = ("ok", "error", "aborted")


@dataclass
class RequestRecord:
    """One finished request."""

    request_id: str
    arrival_ns: int
    first_token_ns: int | None
    finish_ns: int
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    worker: str | None
    role: str
    status: str
    finish_reason: str | None
    session_id: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"request status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def to_json(self) -> str:
        return json.dumps({"type": "request", **asdict(self)}, separators=(",", ":"))


class RequestLog:
    """Appends :class:`RequestRecord` lines to a file (thread-safe). ``path=None`` logs nothing."""

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self.written = 0
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: RequestRecord) -> None:
        if self._file is None:
            return
        line = record.to_json() + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            self.written += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_request_log(path: str | Path) -> list[dict]:
    """The records of a request log. Lines of other types are skipped (forward compatibility); a malformed
    line (a crash mid-write, say) is skipped with a warning naming its line number, never an exception."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: malformed request-log line skipped (%s)", path, lineno, exc)
                continue
            if isinstance(obj, dict) and obj.get("type") == "request":
                records.append(obj)
    return records
