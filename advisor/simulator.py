"""Discrete-event simulator of one placement: per-request TTFT, TPOT and ITL under a given request rate.

What it models (issue 5, "Discrete-event simulator"):

* arrivals: gamma inter-arrival times with the workload's burstiness (shape 1 = Poisson), requests drawn
  from the workload's empirical rows with a seeded generator: the same seed gives the same result;
* prefill workers (split): FCFS, each step batches the queued prompts up to ``prefill_max_tokens``
  (``prefill_max_batch`` prompts; 1 makes the queue M/G/1), or, when the cluster fixes the engine's token
  budget, up to that many tokens with the last prompt chunked across steps; the first token is sampled at
  the end of the prefill, so TTFT ends there;
* KV links: each decode (or colocated) instance receives KV over its own link of ``tp x`` the per-GPU
  bandwidth, one transfer at a time (contention queues); the transfer delays the second token;
* decode workers: continuous batching; a request joins when its KV has arrived and the KV cache stays under
  the high watermark (admission), and leaves after ``output - 1`` steps;
* colocated workers: decodes first, then prefill chunks fill the step's token budget (chunked prefill); with
  no budget (``chunk=0``) a waiting prompt runs as a prefill-only step that stalls the decodes (the classic
  interference);
* prefix cache and multi-turn sessions: a request's cached prompt tokens are skipped by the prefill
  (attention over them still costs the ``2 l p`` term); in split mode only shared-prefix hits count, the
  session history lives on the decode side and is recomputed (``Workload.effective_prompt``). Routing is
  session-affine in colocated mode, which is what makes those history hits possible there;
* least-loaded routing (fewest outstanding requests) to every pool;
* step cadence: each step takes the host gap before it plus its GPU time (``StepCoefficients.*_step``), the
  engine's and the serving path's host time (advisor/host_gap.py);
* steady state (``warmup_s``): a run starts empty and ends draining, and both ends are lighter than the
  steady load: the first requests find no decode batch, the last ones see it shrink. With ``warmup_s`` only
  the requests arriving at least that long after the first arrival and before the last are measured, and
  only the steps run between those times (warm-up deletion, as in Law, *Simulation Modeling and Analysis*,
  ch. 9.5). Without it every request counts, as in a load run of that length.

Not modelled: preemption (admission control keeps the KV under the watermark instead), pipeline
parallelism, and the front-end's own latency.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.screen import Placement
from phaselens.advisor.step_model import StepCoefficients, StepModel, kv_capacity_tokens
from phaselens.advisor.workload import Workload

DEFAULT_REQUESTS = 1000
#: Prompts batched into one prefill step at most (split prefill workers), tokens.
PREFILL_MAX_TOKENS = 16384


@dataclass
class SimResult:
    """Per-request latencies of one run and the SLO verdict."""

    rate: float
    ttft: np.ndarray
    #: NaN for single-token outputs (no TPOT)
    tpot: np.ndarray
    #: decode step durations and how many sequences each carried (ITL, weighted by batch)
    step_s: np.ndarray
    step_batch: np.ndarray
    finished: int
    total: int
    slo: Slo
    #: per worker, the share of the measured window (the whole run without one) it spent running steps
    busy: dict[str, float] = field(default_factory=dict)

    def quantile(self, what: str, q: float) -> float:
        arr = self.ttft if what == "ttft" else self.tpot
        arr = arr[~np.isnan(arr)]
        # "higher": no interpolation, so an unfinished request (inf) never turns a quantile into nan
        return float(np.quantile(arr, q, method="higher")) if len(arr) else 0.0

    @property
    def ttft_q(self) -> float:
        return self.quantile("ttft", self.slo.ttft_pct / 100.0)

    @property
    def tpot_q(self) -> float:
        return self.quantile("tpot", self.slo.tpot_pct / 100.0)

    @property
    def joint_attainment(self) -> float:
        """Share of requests meeting both targets (unfinished ones miss)."""
        ok_t = self.ttft <= self.slo.ttft_s
        ok_p = np.isnan(self.tpot) | (self.tpot <= self.slo.tpot_s)
        return float((ok_t & ok_p).sum() / self.total)

    @property
    def meets_slo(self) -> bool:
        ok = self.ttft_q <= self.slo.ttft_s and self.tpot_q <= self.slo.tpot_s
        if self.slo.attainment is not None:
            ok = ok and self.joint_attainment >= self.slo.attainment
        return ok

    def itl_quantile(self, q: float) -> float:
        if not len(self.step_s):
            return 0.0
        order = np.argsort(self.step_s)
        w = np.cumsum(self.step_batch[order])
        return float(self.step_s[order][np.searchsorted(w, q * w[-1])])

    def summary(self) -> dict[str, Any]:
        return {
            "rate_rps": self.rate,
            "finished": self.finished,
            "total": self.total,
            "ttft_q_s": self.ttft_q,
            "tpot_q_s": self.tpot_q,
            "joint_attainment": self.joint_attainment,
            "ttft_mean_s": float(np.nanmean(self.ttft[np.isfinite(self.ttft)])) if self.finished else None,
            "itl_p50_s": self.itl_quantile(0.5),
            "itl_p99_s": self.itl_quantile(0.99),
            "meets_slo": self.meets_slo,
            "busy": self.busy,
        }


class _Reqs:
    """Struct-of-arrays request state."""

    def __init__(
        self,
        arrival: np.ndarray,
        prompt: np.ndarray,
        out: np.ndarray,
        cached: np.ndarray,
        kv_bytes_per_token: float,
    ):
        n = len(arrival)
        self.arrival = arrival.tolist()
        self.prompt = prompt.tolist()
        self.out = out.tolist()
        self.cached = cached.tolist()
        self.kv_bytes = (prompt * kv_bytes_per_token).tolist()
        self.first = [math.nan] * n
        self.finish = [math.nan] * n

    def chunk(self, item: list[int], budget: int, whole: bool) -> tuple[int, float]:
        """Tokens a step takes of the queued prompt ``item`` ([request, tokens done]): the rest of it when
        ``whole``, else up to ``budget``; and their quadratic prefill feature ``k^2 + 2 k p`` (``p``: the
        tokens before them, cached or done)."""
        j, done = item
        left = self.prompt[j] - self.cached[j] - done
        k = left if whole else min(left, budget)
        past = self.cached[j] + done
        return k, k * k + 2.0 * k * past


class _Worker:
    def __init__(self, sim: "Simulator", co: StepCoefficients, name: str):
        self.sim = sim
        self.co = co
        self.name = name
        self.load = 0  # outstanding requests (routing)
        self.busy_s = 0.0  # GPU time inside the simulator's measured window

    def add_busy(self, now: float, dt: float) -> None:
        """Count the part of a step ``[now, now + dt]`` inside the measured window as busy time."""
        start, end = self.sim.window
        self.busy_s += max(0.0, min(now + dt, end) - max(now, start))


class _DecodeSide(_Worker):
    """Continuous batching with KV admission; base of decode and colocated workers."""

    def __init__(self, sim: "Simulator", co: StepCoefficients, name: str, capacity: int, link_bps: float):
        super().__init__(sim, co, name)
        self.capacity = capacity * sim.cluster.kv_high_watermark
        #: the engine's max_num_seqs: sequences running (decoding or mid-prefill) at once
        self.max_seqs = sim.cluster.max_num_seqs or (1 << 30)
        self.link_bps = link_bps
        self.link_free = 0.0
        self.n = 0
        self.ctx = 0.0
        self.step_no = 0
        self.ends: list[tuple[int, int]] = []
        self.waiting: deque[int] = deque()
        self.busy = False

    def receive_kv(self, now: float, j: int) -> None:
        """Queue the transfer of request ``j``'s KV on this instance's link."""
        r = self.sim.reqs
        start = max(now, self.link_free)
        self.link_free = start + r.kv_bytes[j] / self.link_bps
        self.sim.push(self.link_free, self._kv_arrived, j)

    def _kv_arrived(self, now: float, j: int) -> None:
        self.waiting.append(j)
        self._admit()
        if not self.busy:
            self._start(now)

    def _admit(self) -> None:
        r = self.sim.reqs
        while self.waiting:
            j = self.waiting[0]
            need = r.prompt[j] + 1
            if self.n and self.ctx + need + r.out[j] > self.capacity:
                break
            if self.n + self._prefilling() >= self.max_seqs:
                break
            self.waiting.popleft()
            self._join(j)

    def _prefilling(self) -> int:
        """Sequences holding a slot while their prefill is under way (colocated workers)."""
        return 0

    def _join(self, j: int) -> None:
        r = self.sim.reqs
        self.n += 1
        self.ctx += r.prompt[j] + 1
        heapq.heappush(self.ends, (self.step_no + r.out[j] - 1, j))

    def _retire(self, now: float) -> None:
        r = self.sim.reqs
        while self.ends and self.ends[0][0] <= self.step_no:
            _, j = heapq.heappop(self.ends)
            r.finish[j] = now
            self.n -= 1
            self.ctx -= r.prompt[j] + r.out[j]
            self.load -= 1
            self.sim.done += 1

    def _start(self, now: float) -> None:
        if self.n == 0:
            self.busy = False
            return
        self.busy = True
        dt = self.co.decode_step(self.n, self.ctx)
        self.sim.record_step(dt, self.n, now)
        self.add_busy(now, dt)
        self.sim.push(now + dt, self._step_done, self.n)

    def _step_done(self, now: float, batch: int) -> None:
        self.step_no += 1
        self.ctx += batch
        self._retire(now)
        self._admit()
        self._start(now)


class _PrefillWorker(_Worker):
    """FCFS prefill steps: whole queued prompts up to ``max_tokens``, or, with the engine's token budget
    ``chunk``, up to ``chunk`` tokens a step with the last prompt split across steps (chunked prefill)."""

    def __init__(self, sim: "Simulator", co: StepCoefficients, name: str, max_tokens: int, max_batch: int,
                 chunk: int = 0):
        super().__init__(sim, co, name)
        self.queue: deque[list[int]] = deque()  # [request, tokens done]
        self.busy = False
        self.max_tokens = max_tokens
        self.max_batch = max_batch
        self.chunk = chunk

    def submit(self, now: float, j: int) -> None:
        self.queue.append([j, 0])
        self.load += 1
        if not self.busy:
            self._start(now)

    def _start(self, now: float) -> None:
        if not self.queue:
            self.busy = False
            return
        r = self.sim.reqs
        taken: list[tuple[list[int], int]] = []
        tokens = 0
        quad = 0.0
        budget = self.chunk or self.max_tokens
        for item in self.queue:
            if budget <= 0 or len(taken) >= self.max_batch:
                break
            k, q = r.chunk(item, budget, whole=not self.chunk)
            if not self.chunk and taken and k > budget:
                break
            quad += q
            tokens += k
            budget -= k
            taken.append((item, k))
        dt = self.co.prefill_step(tokens, quad, len(taken))
        self.busy = True
        self.add_busy(now, dt)
        self.sim.push(now + dt, self._done, taken)

    def _done(self, now: float, taken: list[tuple[list[int], int]]) -> None:
        r = self.sim.reqs
        for item, k in taken:
            item[1] += k
            j = item[0]
            if item[1] < r.prompt[j] - r.cached[j]:
                continue  # more chunks to go
            self.queue.popleft() if self.queue and self.queue[0] is item else self.queue.remove(item)
            r.first[j] = now
            self.load -= 1
            if r.out[j] <= 1:
                r.finish[j] = now
                self.sim.done += 1
            else:
                target = self.sim.route(self.sim.decoders)
                target.load += 1
                target.receive_kv(now, j)
        self._start(now)


class _ColocatedWorker(_DecodeSide):
    """Decodes first, then prefill chunks within the step budget (chunk 0: prefill-only steps)."""

    def __init__(
        self, sim: "Simulator", co: StepCoefficients, name: str, capacity: int, link_bps: float, chunk: int
    ):
        super().__init__(sim, co, name, capacity, link_bps)
        self.chunk = chunk
        self.pq: deque[list[int]] = deque()  # [request, tokens done]
        self.n_prefilling = 0  # prompts part-way through a chunked prefill (each holds a sequence slot)

    def _prefilling(self) -> int:
        return self.n_prefilling

    def submit(self, now: float, j: int) -> None:
        self.pq.append([j, 0])
        self.load += 1
        if not self.busy:
            self._start(now)

    def _start(self, now: float) -> None:
        r = self.sim.reqs
        if not self.n and not self.pq:
            self.busy = False
            return
        taken: list[tuple[list[int], int]] = []
        tokens = 0
        quad = 0.0
        kv_room = self.capacity - self.ctx
        slots = self.max_seqs - self.n - self._prefilling()
        if self.chunk == 0:
            # no chunking: an admissible waiting prompt runs alone, whole (prefill priority); decodes wait
            head = self.pq[0] if self.pq else None
            admissible = head is not None and (
                head[1] > 0 or not self.n or (r.prompt[head[0]] + r.out[head[0]] <= kv_room and slots > 0)
            )
            budget = PREFILL_MAX_TOKENS if admissible else 0
            decodes = 0 if admissible else self.n
        else:
            decodes = self.n
            budget = max(0, self.chunk - self.n)
        for item in self.pq:
            if budget <= 0:
                break
            j, done = item
            if done == 0:
                need = r.prompt[j] + r.out[j]
                if (self.n or taken) and need > kv_room:
                    break  # KV admission: the next prompt waits until decodes finish
                if (self.n or taken) and slots <= 0:
                    break  # max_num_seqs: the next prompt waits for a sequence to finish
                kv_room -= need
                slots -= 1
            k, q = r.chunk(item, budget, whole=self.chunk == 0)
            if self.chunk == 0 and taken and k > budget:
                break  # no chunking: a whole prompt that would overrun the step's token limit waits
            quad += q
            tokens += k
            budget -= k
            taken.append((item, k))
        if not tokens and not decodes:
            self.busy = False  # nothing runnable until a decode finishes or KV arrives
            return
        if tokens and decodes:
            dt = self.co.mixed_step(tokens, quad, decodes, self.ctx, len(taken))
        elif tokens:
            dt = self.co.prefill_step(tokens, quad, len(taken))
        else:
            dt = self.co.decode_step(decodes, self.ctx)
        if decodes:
            self.sim.record_step(dt, decodes, now)
        self.busy = True
        self.add_busy(now, dt)
        self.sim.push(now + dt, self._colo_done, (decodes, taken))

    def _colo_done(self, now: float, payload: tuple[int, list[tuple[list[int], int]]]) -> None:
        decodes, taken = payload
        r = self.sim.reqs
        if decodes:
            self.step_no += 1
            self.ctx += decodes
            self._retire(now)
        for item, k in taken:
            started = item[1] > 0
            item[1] += k
            j = item[0]
            if item[1] < r.prompt[j] - r.cached[j]:
                self.n_prefilling += not started
            else:
                self.n_prefilling -= started
                self.pq.popleft() if self.pq and self.pq[0] is item else self.pq.remove(item)
                r.first[j] = now
                if r.out[j] <= 1:
                    r.finish[j] = now
                    self.load -= 1
                    self.sim.done += 1
                else:
                    self._join(j)
        self._admit()
        self._start(now)

    def _kv_arrived(self, now: float, j: int) -> None:
        # conditional mode: a remotely prefilled request joins the decodes
        self.waiting.append(j)
        self._admit()
        if not self.busy:
            self._start(now)


class Simulator:
    """Simulates one placement of a workload; ``run(rate)`` returns per-request latencies."""

    def __init__(
        self,
        model: StepModel,
        workload: Workload,
        slo: Slo,
        cluster: Cluster,
        placement: Placement,
        *,
        n_requests: int = DEFAULT_REQUESTS,
        seed: int = 0,
        prefill_max_tokens: int = PREFILL_MAX_TOKENS,
        prefill_max_batch: int = 1 << 30,
        warmup_s: float | None = None,
    ):
        if warmup_s is not None and warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {warmup_s}")
        self.model = model
        self.workload = workload
        self.slo = slo
        self.cluster = cluster
        self.placement = placement
        self.n_requests = n_requests
        self.seed = seed
        self.prefill_max_tokens = prefill_max_tokens
        self.prefill_max_batch = prefill_max_batch
        #: measure only the requests arriving in [first + warmup_s, last - warmup_s] (None: all of them)
        self.warmup_s = warmup_s

    # -- event plumbing used by the workers
    def push(self, t: float, fn: Any, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn, arg))

    def record_step(self, dt: float, batch: int, now: float) -> None:
        """A decode-carrying step of ``dt`` seconds and ``batch`` sequences, starting at ``now``."""
        self._steps_t.append(now)
        self._steps_s.append(dt)
        self._steps_b.append(batch)

    @staticmethod
    def route(workers: list[Any]) -> Any:
        return min(workers, key=lambda w: w.load)

    def _build(self) -> tuple[list[Any], list[Any]]:
        pl, cl = self.placement, self.cluster
        cap = {
            tp: kv_capacity_tokens(cl.model, cl.gpu, tp, cl.dtype_bytes, cl.memory_utilization)
            for tp in {pl.tp_p, pl.tp_d}
            if tp
        }
        prefill: list[Any] = []
        if pl.kind in ("split", "conditional"):
            co = self.model.coefficients(pl.tp_p)
            # the engine's token budget per step holds on a prefill worker too
            prefill = [
                _PrefillWorker(self, co, f"p{i}", self.prefill_max_tokens, self.prefill_max_batch,
                               cl.chunk_budget or 0)
                for i in range(pl.n_p)
            ]
        co_d = self.model.coefficients(pl.tp_d)
        link = cl.link_bytes_per_s * pl.tp_d
        if pl.kind == "split":
            decoders: list[Any] = [
                _DecodeSide(self, co_d, f"d{i}", cap[pl.tp_d], link) for i in range(pl.n_d)
            ]
        else:
            decoders = [
                _ColocatedWorker(self, co_d, f"c{i}", cap[pl.tp_d], link, pl.chunk or 0)
                for i in range(pl.n_d)
            ]
        return prefill, decoders

    def run(self, rate: float) -> SimResult:
        """Simulate ``n_requests`` arrivals at ``rate`` req/s until all finish (or the horizon); the result
        holds the measured requests (all, or those of the steady-state window)."""
        rng = np.random.default_rng(self.seed)
        n = self.n_requests
        split_side = self.placement.kind in ("split", "conditional")
        idx = rng.integers(0, self.workload.n, size=n)
        wl = self.workload
        prompt = wl.prompt_tokens[idx]
        out = wl.output_tokens[idx]
        cached_colo = wl.cached_tokens[idx]
        cached_split = wl.static_cached[idx]
        arrival = wl.arrival_times(n, rate, rng)
        remote = np.zeros(n, bool)
        if self.placement.kind == "split":
            remote[:] = True
        elif self.placement.kind == "conditional":
            remote = (prompt - cached_split) > (self.placement.threshold or 0)
        cached = np.where(remote, cached_split, cached_colo) if split_side else cached_colo
        self.reqs = _Reqs(
            arrival, prompt, out, cached, self.cluster.model.kv_bytes_per_token(self.cluster.dtype_bytes)
        )
        self._events: list[tuple[float, int, Any, Any]] = []
        self._seq = 0
        self._steps_t: list[float] = []
        self._steps_s: list[float] = []
        self._steps_b: list[int] = []
        self.done = 0
        #: the measured window: requests arriving in it count, and the steps and busy time run in it
        self.window = (-math.inf, math.inf)
        if self.warmup_s is not None:
            self.window = (float(arrival[0]) + self.warmup_s, float(arrival[-1]) - self.warmup_s)
        start, end = self.window
        measured = (arrival >= start) & (arrival <= end)
        if self.warmup_s is not None and not measured.any():
            raise ValueError(
                f"no request arrives in the steady-state window: {n} arrivals over "
                f"{float(arrival[-1] - arrival[0]):.3g} s, warm-up {self.warmup_s:.3g} s at each end"
            )
        self.prefill, self.decoders = self._build()
        # Past this, an overloaded run has shown what it needs to: unfinished requests count as misses.
        horizon = (
            float(arrival[-1]) + 10.0 + 3 * (self.slo.ttft_s + self.slo.tpot_s * float(np.quantile(out, 0.9)))
        )
        arr = arrival.tolist()
        rem = remote.tolist()
        i = 0
        events = self._events
        now = 0.0
        while i < n or events:
            if i < n and (not events or arr[i] <= events[0][0]):
                now = arr[i]
                if rem[i]:
                    self.route(self.prefill).submit(now, i)
                else:
                    self.route(self.decoders).submit(now, i)
                i += 1
                continue
            now, _, fn, arg = heapq.heappop(events)
            if now > horizon:
                break
            fn(now, arg)
        r = self.reqs
        first = np.asarray(r.first)
        finish = np.asarray(r.finish)
        ttft = np.where(np.isnan(first), math.inf, first - arrival + self.cluster.ttft_overhead_s)
        steps = out - 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out <= 1, math.nan, (finish - first) / np.maximum(steps, 1))
        tpot = np.where((out > 1) & np.isnan(finish), math.inf, tpot)
        # a share of the window's length, or of the whole run's when every request counts
        span = end - start if self.warmup_s is not None else max(now, 1e-9)
        busy = {w.name: w.busy_s / span for w in (*self.prefill, *self.decoders)}
        step_t = np.asarray(self._steps_t)
        in_window = (step_t >= start) & (step_t <= end)
        step_s = np.asarray(self._steps_s)[in_window]
        step_b = np.asarray(self._steps_b, dtype=float)[in_window]
        return SimResult(
            rate,
            ttft[measured],
            tpot[measured],
            step_s,
            step_b,
            int(np.isfinite(finish[measured]).sum()),
            int(measured.sum()),
            self.slo,
            busy,
        )
