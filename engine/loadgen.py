"""The load generator behind ``phaselens load``: a seeded workload, a streaming client, and its statistics.

Pipeline: :func:`build_workload` draws the requests (arrival gaps, prompt and output lengths, sessions),
:class:`LoadGenerator` replays them against an OpenAI-compatible server with one streaming HTTP request
each and times every chunk, and :func:`summarize` turns the per-request results into percentiles,
throughput, SLO attainment and goodput.

Arrivals (as vLLM's ``benchmark_serving`` draws them): gaps are Gamma(shape=burstiness,
scale=1/(rate*burstiness)); burstiness 1 is a Poisson process, below 1 is burstier, above 1 more regular.
``rate=inf`` sends everything at once.

Lengths: seeded lognormals clipped to ``[lo, hi]``, or pairs read from a JSONL file. The defaults are
ShareGPT-like: the vLLM paper (Kwon et al., SOSP 2023, section 6.1) reports ShareGPT means of about 161
prompt and 338 output tokens with long right tails; a lognormal with sigma 1 has mean = median * e^0.5, so
medians 98 (prompt) and 205 (output) give those means before clipping. Clipped to 4..2048 and 1..1024.
These are approximations of the shape, not a replay of the data set.

Prompts are token ids (the completions API accepts them), drawn from printable ASCII byte values 32..126,
which are valid ids in every vocabulary phaselens serves, so a prompt of N ids is N tokens on any model.
Output lengths are enforced with ``ignore_eos`` (the vLLM extension; random-weight models emit EOS early).

Multi-turn sessions (``turns > 1``): a session's next turn starts when its previous turn has finished plus
an exponential think time; its prompt is the previous prompt, then a stand-in for the previous answer
(``output`` random ids), then a new user part, so turn k's prompt starts with turn k-1's whole prompt:
the prefix cache can serve it. ``shared_prefix`` ids open every prompt (a common system prompt).

Timing: TTFT is from sending the request to the first chunk that carries a token; each further chunk
gives an inter-token latency (the server sends one chunk per engine step); TPOT is
``(last chunk - first chunk) / (output tokens - 1)``, output tokens from the response's ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: ShareGPT-like defaults (module docstring): (median, sigma, lo, hi) in tokens
SHAREGPT_PROMPT = (98.0, 1.0, 4, 2048)
SHAREGPT_OUTPUT = (205.0, 1.0, 1, 1024)
_ASCII_LO, _ASCII_HI = 32, 127


@dataclass(frozen=True)
class LengthDist:
    """A lognormal with the given median and sigma (of the log), rounded and clipped to ``[lo, hi]``."""

    median: float
    sigma: float
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.lo <= self.hi):
            raise ValueError(f"bad length distribution: median {self.median}, sigma {self.sigma}, "
                             f"clip [{self.lo}, {self.hi}] (need median > 0, sigma >= 0, 1 <= lo <= hi)")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        raw = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=n)
        return np.clip(np.rint(raw), self.lo, self.hi).astype(int)


def arrival_gaps(rng: np.random.Generator, n: int, rate: float, burstiness: float = 1.0) -> np.ndarray:
    """``n`` gaps between arrivals, seconds: Gamma(burstiness, 1/(rate*burstiness)); zeros if rate is inf."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def read_lengths(path: str | Path) -> list[tuple[int, int]]:
    """``(prompt_tokens, output_tokens)`` pairs from a JSONL file; ValueError names the file and line."""
    pairs = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                p, o = obj["prompt_tokens"], obj["output_tokens"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected {{\"prompt_tokens\": N, \"output_tokens\": M}} "
                                 f"({type(exc).__name__}: {exc})") from None
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (p, o)):
                raise ValueError(f"{path}:{lineno}: prompt_tokens and output_tokens must be integers >= 1, "
                                 f"got {p!r}, {o!r}")
            pairs.append((p, o))
    if not pairs:
        raise ValueError(f"{path}: no length records")
    return pairs


@dataclass
class PlannedRequest:
    """One request of the workload."""

    index: int
    session: int
    turn: int
    #: seconds after the start when the request is sent (first turns); later turns follow their previous one
    offset_s: float
    prompt: list[int]
    max_tokens: int
    #: seconds to wait after the previous turn finished (later turns only)
    think_s: float = 0.0


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send: how many, how fast, how long."""

    num_requests: int = 200
    rate: float = 10.0
    burstiness: float = 1.0
    seed: int = 0
    prompt: LengthDist = LengthDist(*SHAREGPT_PROMPT)
    output: LengthDist = LengthDist(*SHAREGPT_OUTPUT)
    lengths: tuple[tuple[int, int], ...] | None = None
    turns: int = 1
    think_time_s: float = 0.0
    shared_prefix: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.think_time_s < 0 or self.shared_prefix < 0:
            raise ValueError("think_time_s and shared_prefix must be >= 0")


def build_workload(spec: WorkloadSpec) -> list[PlannedRequest]:
    """The requests of ``spec``, the same for the same seed."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if spec.lengths:
        pairs = [spec.lengths[i % len(spec.lengths)] for i in range(n)]
        plens = np.array([p for p, _ in pairs])
        olens = np.array([o for _, o in pairs])
    else:
        plens, olens = spec.prompt.sample(rng, n), spec.output.sample(rng, n)
    sessions = math.ceil(n / spec.turns)
    starts = np.cumsum(arrival_gaps(rng, sessions, spec.rate, spec.burstiness))
    starts -= starts[0] if len(starts) else 0.0
    prefix = rng.integers(_ASCII_LO, _ASCII_HI, size=spec.shared_prefix).tolist()
    out: list[PlannedRequest] = []
    for s in range(sessions):
        history = list(prefix)
        for t in range(spec.turns):
            i = len(out)
            if i >= n:
                break
            if t > 0:  # a stand-in for the previous answer, then the new user part
                history += rng.integers(_ASCII_LO, _ASCII_HI, size=int(out[-1].max_tokens)).tolist()
            history += rng.integers(_ASCII_LO, _ASCII_HI, size=int(plens[i])).tolist()
            think = float(rng.exponential(spec.think_time_s)) if t > 0 and spec.think_time_s > 0 else 0.0
            out.append(PlannedRequest(index=i, session=s, turn=t, offset_s=float(starts[s]),
                                      prompt=list(history), max_tokens=int(olens[i]), think_s=think))
    return out


@dataclass
class RequestResult:
    """What the client measured for one request. Times in seconds; ``start_ns`` wall clock."""

    index: int
    session: int
    turn: int
    request_id: str | None
    ok: bool
    status_code: int | None
    error: str | None
    start_ns: int
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    itl_s: list[float] = field(default_factory=list)


class LoadGenerator:
    """Replays a workload against ``base_url`` (``http://host:port``) with streaming completions."""

    def __init__(self, base_url: str, model: str, requests: list[PlannedRequest], temperature: float = 0.0,
                 max_concurrency: int | None = None, timeout_s: float = 600.0,
                 on_done: Callable[[RequestResult], None] | None = None):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.requests = requests
        self.temperature = temperature
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.on_done = on_done
        self.duration_s = 0.0

    def run(self) -> list[RequestResult]:
        """Send everything; returns one result per planned request, in plan order."""
        return asyncio.run(self._run())

    async def _run(self) -> list[RequestResult]:
        import httpx

        limits = httpx.Limits(max_connections=self.max_concurrency or 10_000, max_keepalive_connections=100)
        sem = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        results: dict[int, RequestResult] = {}
        by_session: dict[int, list[PlannedRequest]] = {}
        for r in self.requests:
            by_session.setdefault(r.session, []).append(r)
        t0 = time.perf_counter()
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            async def session(turns: list[PlannedRequest]) -> None:
                delay = turns[0].offset_s - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)  # the arrival schedule, not a wait for a condition
                for req in turns:
                    if req.think_s:
                        await asyncio.sleep(req.think_s)
                    if sem is not None:
                        async with sem:
                            res = await self._one(client, req)
                    else:
                        res = await self._one(client, req)
                    results[req.index] = res
                    if self.on_done is not None:
                        self.on_done(res)

            await asyncio.gather(*(session(turns) for turns in by_session.values()))
        self.duration_s = time.perf_counter() - t0
        return [results[r.index] for r in self.requests]

    async def _one(self, client: Any, req: PlannedRequest) -> RequestResult:
        import httpx

        body = {"model": self.model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                "temperature": self.temperature, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        headers = {"X-Session-ID": f"s{req.session}"}
        res = RequestResult(index=req.index, session=req.session, turn=req.turn, request_id=None, ok=False,
                            status_code=None, error=None, start_ns=time.time_ns(),
                            prompt_tokens=len(req.prompt), output_tokens=0, cached_tokens=0, ttft_s=None,
                            tpot_s=None, e2e_s=None)
        start = time.perf_counter()
        first: float | None = None
        last: float | None = None
        try:
            async with client.stream("POST", f"{self.base_url}/v1/completions", json=body,
                                     headers=headers) as resp:
                res.status_code = resp.status_code
                if resp.status_code != 200:
                    raw = await resp.aread()
                    res.error = _error_message(raw, resp.status_code)
                    return res
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        res.ok = res.error is None
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if "error" in chunk:
                        res.error = chunk["error"].get("message", "error event")
                        break
                    res.request_id = res.request_id or chunk.get("id")
                    if chunk.get("usage"):
                        u = chunk["usage"]
                        res.output_tokens = int(u.get("completion_tokens", 0))
                        res.prompt_tokens = int(u.get("prompt_tokens", res.prompt_tokens))
                        details = u.get("prompt_tokens_details") or {}
                        res.cached_tokens = int(details.get("cached_tokens", 0))
                    if chunk.get("choices") and chunk["choices"][0].get("finish_reason") is None:
                        if first is None:
                            first = now
                        elif last is not None:
                            res.itl_s.append(now - last)
                        last = now
        except (httpx.HTTPError, OSError, json.JSONDecodeError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        end = time.perf_counter()
        if first is not None:
            res.ttft_s = first - start
        if res.ok:
            res.e2e_s = end - start
            if res.output_tokens > 1 and first is not None and last is not None:
                res.tpot_s = (last - first) / (res.output_tokens - 1)
        return res


def _error_message(raw: bytes, status: int) -> str:
    try:
        return f"HTTP {status}: {json.loads(raw)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {raw[:200].decode(errors='replace')}"


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """``{"mean", "p50", "p90", "p99"}`` of ``values`` (None when empty); linear interpolation."""
    if not values:
        return {"mean": None, **{f"p{q:g}": None for q in qs}}
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{q:g}": float(np.percentile(arr, q)) for q in qs}}


def summarize(results: list[RequestResult], duration_s: float, slo_ttft_s: float | None = None,
              slo_tpot_s: float | None = None) -> dict[str, Any]:
    """The run's summary. SLO attainment counts every sent request (a failed one misses); goodput is the
    rate of requests that completed within both SLOs (DistServe's definition)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    itl = [g for r in ok for g in r.itl_s]

    def meets(r: RequestResult) -> bool:
        if not r.ok:
            return False
        if slo_ttft_s is not None and (r.ttft_s is None or r.ttft_s > slo_ttft_s):
            return False
        if slo_tpot_s is not None and r.tpot_s is not None and r.tpot_s > slo_tpot_s:
            return False
        return True

    good = sum(1 for r in results if meets(r))
    dur = max(duration_s, 1e-9)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = r.error.split(":")[0] if r.error else "incomplete"
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur, "output_token_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "prompt_tokens": in_tokens, "output_tokens": out_tokens,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s,
                "attainment": good / len(results) if results else None, "goodput_rps": good / dur},
    }


def results_json(summary: dict[str, Any], results: list[RequestResult], spec: WorkloadSpec) -> dict[str, Any]:
    """Everything about a run as one JSON-able object."""
    spec_d = asdict(spec)
    if math.isinf(spec.rate):
        spec_d["rate"] = "inf"  # JSON has no infinity
    if spec_d.get("lengths") is not None:
        spec_d["lengths"] = f"{len(spec.lengths or ())} pairs"
    return {"spec": spec_d, "summary": summary, "requests": [asdict(r) for r in results]}
