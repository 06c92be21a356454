"""The workload the advisor plans for: arrival rate and burstiness, length distributions, prefix reuse.

Three sources (issue 5, "Workload"):

* the engine's request log (docs/contracts.md, "Request log"): measured lengths, cached tokens, sessions;
* a Prometheus range query over the engine's and the agent's metrics: rate and mean lengths only, so the
  length *distributions* are an assumption there (lognormal around the measured means), and the workload
  says so in ``notes``;
* a spec: ``rate=4,prompt=lognormal:800:0.8,output=fixed:200,burstiness=1,prefix_hit=0.2,multi_turn=0.3``.

Lengths are kept as an empirical sample (one row per request): the screen takes moments from it and the
simulator draws requests from it. Cached prompt tokens are split into the part any worker's prefix cache
can serve (a shared system prompt: ``static_cached``) and the part that is the history of the same
session (multi-turn): that history lives where the previous turn *decoded*, so a split deployment's
prefill pool does not have it and must recompute it ("prefix reuse on the decode side").
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: Default sample size when a workload is built from distributions.
SPEC_SAMPLES = 4000
#: Length distribution assumed where only means are known (Prometheus): lognormal with this sigma
#: (ShareGPT-like spread; documented in ``notes``).
ASSUMED_SIGMA = 0.8


class WorkloadError(ValueError):
    """A workload that cannot be built; the message names the bad value."""


@dataclass(frozen=True)
class LoggedTimes:
    """When each row of a request-log workload arrived, got its first token and finished (s, the log's own
    clock; NaN where unknown), on which worker, and whether that worker also prefilled it (colocated)."""

    arrival_s: np.ndarray
    first_s: np.ndarray
    finish_s: np.ndarray
    worker: np.ndarray
    colocated: np.ndarray


@dataclass(frozen=True)
class Workload:
    """Requests per second and one row per sampled request."""

    rate: float
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    #: cached prompt tokens any worker's prefix cache serves (shared prefixes)
    static_cached: np.ndarray
    #: cached prompt tokens that are this session's earlier turns (on the worker that decoded them)
    history_cached: np.ndarray
    #: gamma shape of inter-arrival times: 1 = Poisson, < 1 burstier (vLLM's ``--burstiness`` convention)
    burstiness: float = 1.0
    source: str = "spec"
    notes: tuple[str, ...] = field(default=())
    #: measured TTFT per row (request log only), seconds; NaN where unknown
    measured_ttft_s: np.ndarray | None = field(default=None, compare=False)
    #: the request log's timeline per row (request log only): the serving overhead's calibration
    logged_times: LoggedTimes | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = len(self.prompt_tokens)
        if n == 0:
            raise WorkloadError("workload has no requests")
        for name in ("output_tokens", "static_cached", "history_cached"):
            if len(getattr(self, name)) != n:
                raise WorkloadError(
                    f"workload column {name} has {len(getattr(self, name))} rows, expected {n}"
                )
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise WorkloadError(f"workload rate must be > 0 requests/s, got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise WorkloadError(f"burstiness must be > 0 (1 = Poisson), got {self.burstiness}")

    # ---------------------------------------------------------------- derived figures

    @property
    def n(self) -> int:
        return len(self.prompt_tokens)

    @property
    def cached_tokens(self) -> np.ndarray:
        return self.static_cached + self.history_cached

    def effective_prompt(self, split: bool) -> np.ndarray:
        """Prompt tokens a prefill must compute: colocated workers hit both caches, a prefill pool only the
        shared-prefix one."""
        cached = self.static_cached if split else self.cached_tokens
        return np.maximum(self.prompt_tokens - cached, 1)

    def effective_cached(self, split: bool) -> np.ndarray:
        return self.prompt_tokens - self.effective_prompt(split)

    @property
    def prefix_hit_rate(self) -> float:
        return float(self.cached_tokens.sum() / max(1, self.prompt_tokens.sum()))

    @property
    def history_share(self) -> float:
        """Fraction of cached tokens that are session history (decode-side)."""
        c = self.cached_tokens.sum()
        return float(self.history_cached.sum() / c) if c else 0.0

    def summary(self) -> dict[str, Any]:
        p, o = self.prompt_tokens, self.output_tokens
        return {
            "source": self.source,
            "rate_rps": self.rate,
            "burstiness": self.burstiness,
            "requests": self.n,
            "prompt_mean": float(p.mean()),
            "prompt_p50": float(np.median(p)),
            "prompt_p90": float(np.quantile(p, 0.9)),
            "output_mean": float(o.mean()),
            "output_p50": float(np.median(o)),
            "output_p90": float(np.quantile(o, 0.9)),
            "prefix_hit_rate": self.prefix_hit_rate,
            "history_share_of_cached": self.history_share,
            "effective_prompt_colocated": float(self.effective_prompt(False).mean()),
            "effective_prompt_split": float(self.effective_prompt(True).mean()),
            "notes": list(self.notes),
        }

    # ---------------------------------------------------------------- variants

    def with_rate(self, rate: float) -> "Workload":
        return replace(self, rate=rate)

    def scaled_prompts(self, factor: float) -> "Workload":
        """Prompt lengths (and their cached parts) times ``factor``: the +-25% robustness check."""

        def sc(a: np.ndarray) -> np.ndarray:
            return np.maximum(np.round(a * factor), 0).astype(np.int64)

        prompt = np.maximum(sc(self.prompt_tokens), 1)
        static = np.minimum(sc(self.static_cached), prompt - 1)
        history = np.minimum(sc(self.history_cached), prompt - 1 - static)
        return replace(
            self,
            prompt_tokens=prompt,
            static_cached=static,
            history_cached=history,
            notes=self.notes + (f"prompt lengths scaled x{factor:g}",),
        )

    def resample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """``n`` requests drawn with replacement: (prompt, output, static_cached, history_cached)."""
        idx = rng.integers(0, self.n, size=n)
        return (
            self.prompt_tokens[idx],
            self.output_tokens[idx],
            self.static_cached[idx],
            self.history_cached[idx],
        )

    def arrival_times(self, n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
        """``n`` arrival times (s) at ``rate``: gamma inter-arrivals with shape ``burstiness``."""
        shape = self.burstiness
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
        return np.cumsum(gaps)

    # ---------------------------------------------------------------- sources

    @classmethod
    def from_arrays(
        cls,
        rate: float,
        prompt: Any,
        output: Any,
        *,
        cached: Any = None,
        history: Any = None,
        burstiness: float = 1.0,
        source: str = "arrays",
        notes: tuple[str, ...] = (),
    ) -> "Workload":
        p = np.asarray(prompt, dtype=np.int64)
        o = np.asarray(output, dtype=np.int64)
        if len(p) == 0:
            raise WorkloadError(f"workload from {source} has no requests")
        if (p < 1).any() or (o < 1).any():
            raise WorkloadError(f"workload from {source}: prompt and output lengths must be >= 1")
        static = np.zeros_like(p) if cached is None else np.asarray(cached, dtype=np.int64)
        hist = np.zeros_like(p) if history is None else np.asarray(history, dtype=np.int64)
        static = np.clip(static, 0, p - 1)
        hist = np.clip(hist, 0, p - 1 - static)
        return cls(
            rate=float(rate),
            prompt_tokens=p,
            output_tokens=o,
            static_cached=static,
            history_cached=hist,
            burstiness=float(burstiness),
            source=source,
            notes=notes,
        )

    @classmethod
    def from_request_log(cls, path: str | Path, *, rate: float | None = None) -> "Workload":
        """From ``phaselens serve --request-log``: finished (``ok``) requests, their rate and burstiness.

        Cached tokens of a request that continues a session (same ``session_id`` seen earlier) count as
        session history; other cached tokens as shared-prefix hits.
        """
        path = Path(path)
        rows = []
        try:
            with path.open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        log.warning("%s:%d: skipped malformed request record", path, number)
                        continue
                    if isinstance(obj, dict) and obj.get("type") == "request" and obj.get("status") == "ok":
                        rows.append(obj)
        except FileNotFoundError:
            raise WorkloadError(f"request log {str(path)!r} does not exist") from None
        usable = []
        for r in rows:
            try:
                first = r.get("first_token_ns")
                ttft = (int(first) - int(r["arrival_ns"])) / 1e9 if first is not None else math.nan
                finish = r.get("finish_ns")
                usable.append(
                    (
                        int(r["arrival_ns"]),
                        int(r["prompt_tokens"]),
                        int(r.get("cached_tokens") or 0),
                        int(r["output_tokens"]),
                        r.get("session_id"),
                        ttft,
                        math.nan if first is None else int(first),
                        math.nan if finish is None else int(finish),
                        str(r.get("worker", "")),
                        r.get("role", "colocated") == "colocated",
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue
        usable = [u for u in usable if u[1] >= 1 and u[3] >= 1]
        if len(usable) < 2:
            raise WorkloadError(
                f"request log {str(path)!r} has {len(usable)} finished requests with token counts; "
                "need at least 2 to estimate a rate"
            )
        usable.sort(key=lambda u: u[0])
        arrivals = np.array([u[0] for u in usable], dtype=float) / 1e9
        span = arrivals[-1] - arrivals[0]
        notes: list[str] = []
        if rate is None:
            if span <= 0:
                raise WorkloadError(
                    f"request log {str(path)!r}: all requests arrived at the same instant; "
                    "give the rate explicitly"
                )
            rate = (len(usable) - 1) / span
        gaps = np.diff(arrivals)
        burst = 1.0
        if len(gaps) >= 10 and gaps.mean() > 0:
            cv2 = float(gaps.var() / gaps.mean() ** 2)
            burst = float(np.clip(1.0 / max(cv2, 1e-3), 0.05, 20.0))
        else:
            notes.append("fewer than 11 requests: Poisson arrivals assumed")
        seen: set[str] = set()
        static, history = [], []
        for _, _, cached, _, session, *_ in usable:
            if session is not None and session in seen:
                static.append(0)
                history.append(cached)
            else:
                static.append(cached)
                history.append(0)
            if session is not None:
                seen.add(session)
        wl = cls.from_arrays(
            rate,
            [u[1] for u in usable],
            [u[3] for u in usable],
            cached=static,
            history=history,
            burstiness=burst,
            source=f"request log {path.name}",
            notes=tuple(notes),
        )
        t0 = usable[0][0]  # ns differences from the first arrival stay exact as floats
        times = LoggedTimes(np.array([(u[0] - t0) / 1e9 for u in usable], dtype=float),
                            np.array([(u[6] - t0) / 1e9 for u in usable], dtype=float),
                            np.array([(u[7] - t0) / 1e9 for u in usable], dtype=float),
                            np.array([u[8] for u in usable]), np.array([u[9] for u in usable], dtype=bool))
        return replace(wl, measured_ttft_s=np.array([u[5] for u in usable], dtype=float), logged_times=times)

    @classmethod
    def from_spec(
        cls, spec: str | dict[str, Any], *, seed: int = 0, samples: int = SPEC_SAMPLES
    ) -> "Workload":
        """From ``key=value`` pairs (or a dict): ``rate``, ``prompt``, ``output`` (``fixed:N``,
        ``lognormal:MEAN:SIGMA``, ``lognormal_median:MEDIAN:SIGMA[:LO:HI]`` as the load generator draws
        them, ``uniform:LO:HI``), ``burstiness``, ``prefix_hit`` (share of prompt tokens
        served from a shared prefix), ``multi_turn`` (share of requests continuing a session), ``history``
        (share of such a request's prompt that is earlier turns, default 0.7), ``max_len``."""
        items = _parse_spec(spec)
        rng = np.random.default_rng(seed)
        known = {"rate", "prompt", "output", "burstiness", "prefix_hit", "multi_turn", "history", "max_len"}
        unknown = set(items) - known
        if unknown:
            raise WorkloadError(
                f"unknown workload spec key {sorted(unknown)[0]!r}; known: {', '.join(sorted(known))}"
            )
        for key in ("rate", "prompt", "output"):
            if key not in items:
                raise WorkloadError(f"workload spec needs {key!r}")
        rate = _number(items, "rate", lo=0.0, lo_open=True)
        max_len = int(_number(items, "max_len", default=131072, lo=2))
        prompt = _lengths(items["prompt"], samples, rng, "prompt", max_len)
        output = _lengths(items["output"], samples, rng, "output", max_len)
        burst = _number(items, "burstiness", default=1.0, lo=0.0, lo_open=True)
        hit = _number(items, "prefix_hit", default=0.0, lo=0.0, hi=1.0)
        multi = _number(items, "multi_turn", default=0.0, lo=0.0, hi=1.0)
        hist_share = _number(items, "history", default=0.7, lo=0.0, hi=1.0)
        is_multi = rng.random(samples) < multi
        history = np.where(is_multi, np.floor(prompt * hist_share), 0).astype(np.int64)
        static = np.floor((prompt - history) * hit).astype(np.int64)
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        return cls.from_arrays(
            rate, prompt, output, cached=static, history=history, burstiness=burst, source=f"spec {text}"
        )

    @classmethod
    def from_prometheus(
        cls,
        url: str,
        start: float,
        end: float,
        *,
        step_s: float = 15.0,
        window: str = "5m",
        get: Callable[[str, dict[str, Any]], Any] | None = None,
        seed: int = 0,
        samples: int = SPEC_SAMPLES,
    ) -> "Workload":
        """From a Prometheus ``query_range`` over ``[start, end]`` (unix seconds).

        Request rate from the engine's TTFT histogram count, mean prompt and output tokens per request from
        the agent's per-phase token counters (names from ``exporters/catalogue.py``). Only means are
        available, so lengths are drawn from lognormals around them (an assumption, noted).
        ``get(url, params) -> decoded JSON`` is the HTTP seam (httpx by default).
        """
        from phaselens.exporters import catalogue

        ttft = catalogue.metric("phaselens_engine_time_to_first_token_seconds").name
        tokens = catalogue.metric("phaselens_phase_tokens_total").name
        queries = {
            "rate": f"sum(rate({ttft}_count[{window}]))",
            "prefill": f'sum(rate({tokens}{{kind="prefill"}}[{window}]))',
            "decode": f'sum(rate({tokens}{{kind="decode"}}[{window}]))',
        }
        if get is None:
            get = _httpx_get
        means = {}
        for key, query in queries.items():
            params = {"query": query, "start": start, "end": end, "step": step_s}
            try:
                body = get(url.rstrip("/") + "/api/v1/query_range", params)
            except Exception as exc:  # noqa: BLE001 - any transport error becomes one clear message
                raise WorkloadError(f"Prometheus at {url!r} did not answer {query!r}: {exc}") from None
            means[key] = _mean_of_range(body, query, url)
        if means["rate"] <= 0:
            raise WorkloadError(
                f"Prometheus at {url!r}: no requests in the range (rate 0 from {queries['rate']!r})"
            )
        prompt_mean = max(1.0, means["prefill"] / means["rate"])
        output_mean = max(1.0, means["decode"] / means["rate"])
        rng = np.random.default_rng(seed)
        prompt = _lognormal(prompt_mean, ASSUMED_SIGMA, samples, rng, 131072)
        output = _lognormal(output_mean, ASSUMED_SIGMA, samples, rng, 131072)
        note = (
            f"from Prometheus: rate {means['rate']:.3g} req/s, mean prompt {prompt_mean:.0f} and output "
            f"{output_mean:.0f} tokens measured; lognormal spread (sigma {ASSUMED_SIGMA}), Poisson arrivals "
            "and no prefix reuse assumed"
        )
        return cls.from_arrays(means["rate"], prompt, output, source=f"prometheus {url}", notes=(note,))


# ---------------------------------------------------------------------- helpers


def _httpx_get(url: str, params: dict[str, Any]) -> Any:
    import httpx

    resp = httpx.get(url, params=params, timeout=10.0)
    resp.raise_for_status()
    return resp.json()


def _mean_of_range(body: Any, query: str, url: str) -> float:
    if not isinstance(body, dict) or body.get("status") != "success":
        raise WorkloadError(f"Prometheus at {url!r} rejected {query!r}: {body!r:.200}")
    result = body.get("data", {}).get("result", [])
    values = [
        float(v[1]) for series in result for v in series.get("values", []) if v[1] not in ("NaN", "+Inf")
    ]
    if not values:
        raise WorkloadError(f"Prometheus at {url!r} has no data for {query!r} in the range")
    return float(np.mean(values))


def _parse_spec(spec: str | dict[str, Any]) -> dict[str, str]:
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    items: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise WorkloadError(f"workload spec item {part!r} is not key=value")
        key, value = part.split("=", 1)
        items[key.strip()] = value.strip()
    return items


def _number(
    items: dict[str, str],
    key: str,
    *,
    default: float | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> float:
    if key not in items:
        assert default is not None
        return default
    try:
        value = float(items[key])
    except ValueError:
        raise WorkloadError(f"workload spec {key}={items[key]!r} is not a number") from None
    if (
        not math.isfinite(value)
        or (lo is not None and (value <= lo if lo_open else value < lo))
        or (hi is not None and value > hi)
    ):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise WorkloadError(f"workload spec {key}={items[key]!r} must be {rng}")
    return value


def _lognormal(mean: float, sigma: float, n: int, rng: np.random.Generator, max_len: int) -> np.ndarray:
    mu = math.log(mean) - sigma * sigma / 2.0  # so that the mean is ``mean``
    return np.clip(np.round(rng.lognormal(mu, sigma, size=n)), 1, max_len).astype(np.int64)


def _lengths(text: str, n: int, rng: np.random.Generator, what: str, max_len: int) -> np.ndarray:
    parts = text.split(":")
    kind = parts[0]
    try:
        args = [float(x) for x in parts[1:]]
    except ValueError:
        raise WorkloadError(f"workload spec {what}={text!r}: arguments must be numbers") from None
    if kind == "fixed" and len(args) == 1 and args[0] >= 1:
        return np.full(n, int(args[0]), dtype=np.int64)
    if kind == "lognormal" and len(args) == 2 and args[0] >= 1 and args[1] >= 0:
        return _lognormal(args[0], args[1], n, rng, max_len)
    if kind == "lognormal_median" and len(args) in (2, 4) and args[0] >= 1 and args[1] >= 0:
        # the load generator's form (engine/loadgen.py LengthDist): median and sigma of the log, clipped
        lo, hi = (args[2], args[3]) if len(args) == 4 else (1.0, float(max_len))
        if 1 <= lo <= hi:
            raw = rng.lognormal(math.log(args[0]), args[1], size=n)
            return np.clip(np.rint(raw), lo, min(hi, max_len)).astype(np.int64)
    if kind == "uniform" and len(args) == 2 and 1 <= args[0] <= args[1]:
        return rng.integers(int(args[0]), int(args[1]) + 1, size=n).astype(np.int64)
    if kind.isdigit() and not args:
        return np.full(n, int(kind), dtype=np.int64)
    raise WorkloadError(
        f"workload spec {what}={text!r}: expected fixed:N, lognormal:MEAN:SIGMA, "
        "lognormal_median:MEDIAN:SIGMA[:LO:HI] or uniform:LO:HI with lengths >= 1"
    )
