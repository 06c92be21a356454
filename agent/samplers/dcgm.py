"""DCGM sampler: scrape a co-located dcgm-exporter's ``/metrics``, or read DCGM through its Python bindings.

dcgm-exporter names each GPU with a ``UUID`` label (plus ``gpu``, ``Hostname`` in older releases and
``hostname`` in newer ones); we match by UUID and accept either hostname label. Profiling fields are
ratios already; utilization is percent; power watts; clocks MHz; framebuffer MiB. DCGM's profiling fields
use GPM on Hopper, so a value that did not change since the previous scrape is treated as "not updated".
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

from phaselens.trace import UTILIZATION_KEYS, SampleRecord

log = logging.getLogger(__name__)

#: dcgm-exporter series name -> (canonical key, scale to our unit)
DCGM_FIELDS: dict[str, tuple[str, float]] = {
    "DCGM_FI_PROF_SM_ACTIVE": ("sm_active", 1.0),
    "DCGM_FI_PROF_SM_OCCUPANCY": ("sm_occupancy", 1.0),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("tensor_active", 1.0),
    "DCGM_FI_PROF_DRAM_ACTIVE": ("dram_active", 1.0),
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": ("fp16_active", 1.0),
    "DCGM_FI_DEV_GPU_UTIL": ("gpu_util", 0.01),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("mem_util", 0.01),
    "DCGM_FI_DEV_POWER_USAGE": ("power_w", 1.0),
    "DCGM_FI_DEV_SM_CLOCK": ("sm_clock_hz", 1e6),
    "DCGM_FI_DEV_FB_USED": ("mem_used_bytes", 1024.0 * 1024.0),
}
#: a failing exporter is logged at most this often
LOG_INTERVAL_S = 60.0
PROFILING_KEYS = ("sm_active", "sm_occupancy", "tensor_active", "dram_active", "fp16_active")


def _http_get(url: str, timeout_s: float) -> str:
    import httpx

    response = httpx.get(url, timeout=timeout_s)
    response.raise_for_status()
    return response.text


class DcgmSampler:
    """Scrapes dcgm-exporter at ``url``; ``http_get(url, timeout_s) -> text`` is the seam tests swap.

    ``uuids`` limits the GPUs (all found by default); ``hostname``, when given, keeps only series whose
    ``Hostname`` or ``hostname`` label matches (a shared exporter). A failed scrape marks the sampler failed
    for that poll (:attr:`last_error`) and returns nothing; a GPU that vanishes from the page is logged once.
    """

    name = "dcgm"

    def __init__(self, url: str = "http://localhost:9400/metrics", uuids: list[str] | None = None,
                 hostname: str | None = None, timeout_s: float = 1.0,
                 http_get: Callable[[str, float], str] = _http_get, clock: Callable[[], int] = time.time_ns):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"dcgm exporter URL must be http(s)://..., got {url!r}")
        self.url, self.uuids, self.hostname, self.timeout_s = url, uuids, hostname, timeout_s
        self.http_get, self.clock = http_get, clock
        self.last_error = ""
        self._previous: dict[str, dict[str, float | None]] = {}
        self._seen: set[str] = set()
        self._missing_logged: set[str] = set()
        self._failures = 0
        self._last_log = -LOG_INTERVAL_S
        self._garbled = 0
        self._last_garbled_log = -LOG_INTERVAL_S

    def sample(self) -> list[SampleRecord]:
        t = self.clock()
        try:
            text = self.http_get(self.url, self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - any transport error: this poll failed, the agent goes on
            self.last_error = f"scrape of {self.url} failed: {exc}"
            self._failures += 1
            now = time.monotonic()
            if now - self._last_log >= LOG_INTERVAL_S:  # once, then at most once a minute
                self._last_log = now
                log.warning("dcgm sampler: %s (%d failed scrapes so far)", self.last_error, self._failures)
            return []
        if self.last_error:
            log.warning("dcgm sampler: %s answers again", self.url)
        self.last_error = ""
        per_gpu = self.parse(text)
        out = []
        for uuid, values in per_gpu.items():
            prev = self._previous.get(uuid)
            prof: dict[str, float | None] = {k: v for k, v in values.items() if k in PROFILING_KEYS}
            if prev is not None and prof and all(prev.get(k) == v for k, v in prof.items()):
                # profiling fields not refreshed since the last scrape
                values = {**values, **{k: None for k in prof}}
            else:
                self._previous[uuid] = prof
            out.append(SampleRecord(gpu_uuid=uuid, source=self.name, t_ns=t, values=values))
        for uuid in self._seen - set(per_gpu):
            if uuid not in self._missing_logged:
                self._missing_logged.add(uuid)
                log.error("dcgm sampler: GPU %s is no longer on %s; going on without it", uuid, self.url)
        self._seen |= set(per_gpu)
        return out

    def parse(self, text: str) -> dict[str, dict[str, float | None]]:
        """UUID -> canonical values from a dcgm-exporter page (unknown series ignored)."""
        out: dict[str, dict[str, float | None]] = {}
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError as exc:
            self.last_error = f"unparseable page from {self.url}: {exc}"
            log.warning("dcgm sampler: %s", self.last_error)
            return out
        for fam in families:
            for s in fam.samples:
                field = DCGM_FIELDS.get(s.name)
                if field is None:
                    continue
                uuid = s.labels.get("UUID") or s.labels.get("uuid")
                if not uuid:
                    continue
                if self.uuids and uuid not in self.uuids:
                    continue
                host = s.labels.get("Hostname", s.labels.get("hostname"))
                if self.hostname and host is not None and host != self.hostname:
                    continue
                key, scale = field
                v = float(s.value) * scale
                # a NaN, an infinity, a negative reading or a ratio above 1 is a garbled page, not a
                # measurement: it is left out and the poll fails (lenient while collecting, never silent)
                if not math.isfinite(v) or v < 0 or (key in UTILIZATION_KEYS and v > 1.0 + 1e-9):
                    self.last_error = f"garbled value {s.name}={s.value!r} for {uuid} from {self.url}"
                    self._garbled += 1
                    now = time.monotonic()
                    if now - self._last_garbled_log >= LOG_INTERVAL_S:  # once, then at most once a minute
                        self._last_garbled_log = now
                        log.warning("dcgm sampler: %s; left out (%d garbled values so far)", self.last_error,
                                    self._garbled)
                    continue
                out.setdefault(uuid, {})[key] = v
        return out


class DcgmBindingsSampler:
    """Reads the same fields through DCGM's Python bindings (``DcgmReader``), when they are importable.

    ``reader`` is the seam: an object with ``GetLatestGpuValuesAsFieldIdDict() -> {gpu_id: {field_id: v}}``
    and ``uuids`` maps DCGM gpu ids to UUIDs. ImportError (naming the module) when the bindings are absent.
    """

    name = "dcgm"

    #: DCGM field ids (dcgm_fields.py) -> canonical key, scale
    FIELD_IDS = {1002: ("sm_active", 1.0), 1003: ("sm_occupancy", 1.0), 1004: ("tensor_active", 1.0),
                 1005: ("dram_active", 1.0), 1008: ("fp16_active", 1.0), 203: ("gpu_util", 0.01),
                 155: ("power_w", 1.0), 100: ("sm_clock_hz", 1e6)}

    def __init__(self, reader: Any = None, uuids: dict[int, str] | None = None,
                 clock: Callable[[], int] = time.time_ns, update_interval_ms: int = 100):
        if reader is None:
            try:
                from DcgmReader import DcgmReader
            except ImportError as exc:
                raise ImportError(f"DCGM Python bindings (DcgmReader) are not importable: {exc}") from None
            reader = DcgmReader(fieldIds=list(self.FIELD_IDS), updateFrequency=update_interval_ms * 1000)
        self.reader, self.uuids, self.clock = reader, uuids or {}, clock
        self.last_error = ""

    def sample(self) -> list[SampleRecord]:
        t = self.clock()
        try:
            data = self.reader.GetLatestGpuValuesAsFieldIdDict()
        except Exception as exc:  # noqa: BLE001 - DCGM raises its own error types; this poll failed
            self.last_error = str(exc)
            log.warning("dcgm bindings sampler: %s", exc)
            return []
        out = []
        for gpu_id, fields in data.items():
            uuid = self.uuids.get(gpu_id, f"GPU-dcgm-{gpu_id}")
            values: dict[str, float | None] = {}
            for fid, value in fields.items():
                if fid in self.FIELD_IDS and value is not None:
                    key, scale = self.FIELD_IDS[fid]
                    values[key] = float(value) * scale
            out.append(SampleRecord(gpu_uuid=uuid, source=self.name, t_ns=t, values=values))
        return out
