"""Closed-form screen: goodput of every split, every colocated chunk budget and every conditional threshold.

Per instance shape the screen finds, by bisection on the request rate, the highest rate one instance
serves within the SLO percentiles ("instance goodput"); a pool of ``n`` instances behind least-loaded
routing serves ``n`` times that (Poisson streams split evenly), except a prefill pool, whose TTFT tail
depends on the pool's size (below). Placements are then enumerated over the cluster's GPUs in integer
instance counts.

Models, per instance (one TP group):

* prefill pool of ``c`` instances: an M/G/c queue (least-loaded routing sends a prompt to an idle instance
  while there is one) with service ``prefill_time(l)``. A prompt waits with the Erlang-C probability
  ``P_w``; the mean wait is Allen-Cunneen's ``P_w E[S] / (c (1 - rho)) * (1 + cv^2) / 2``, which for
  ``c = 1`` is Pollaczek-Khinchine's ``lambda E[S^2] / (2 (1 - rho))``; a wait is exponential with mean
  ``E[W] / P_w`` (the usual tail form); TTFT = wait + service. Treating the pool as ``c`` separate M/G/1
  queues instead overstates the wait: where the service time alone is near the TTFT target (long prompts
  on a small TP), a second instance roughly halves the share of prompts that wait at all, and the screen
  passed such pools over (2 x TP1 prefill scored 1.10 req/s per GPU against 2.16 simulated, in the
  DistServe golden). Least-loaded routing commits a prompt to one instance, so it is a little worse than
  one central queue: the P90 TTFT of a 2-instance pool is under the simulator's by about 0 / 13 / 18% at
  utilisation 0.3 / 0.5 / 0.7 (``tests/advisor/test_simulator.py``). Erring that way only sends such a pool
  to the simulator, which decides.
* decode instance: continuous batching; Little's law gives the running batch ``N = lambda E[o-1] T`` at the
  step time ``T = decode_time(N, N * mean context)`` (fixed point); KV must hold ``N`` contexts under the
  high watermark. The KV of each request arrives over the instance's link (an M/G/1 queue of transfers)
  and delays its second token: TPOT = T + (link wait + transfer) / (o - 1).
* colocated instance with chunk budget ``C``: decodes first, prefill chunks fill ``C - N`` tokens per step.
  Prefill work ``w(l)`` per request stretches every step: ``T = d(N) / (1 - lambda E[w])``; a request's TPOT
  carries the prefill work that arrived during its life (compound Poisson, normal approximation); its TTFT
  is an M/G/1 wait plus ``ceil(l / (C - N))`` steps.
* conditional: prompts longer than a threshold are prefilled in a prefill pool and their KV sent to the
  colocated pool, which prefills the short ones itself.

Tail quantiles are taken over the workload's empirical requests with common random numbers (fixed seed),
so the screen is deterministic and monotone in the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from phaselens.advisor.inputs import Cluster, Slo
from phaselens.advisor.step_model import StepCoefficients, StepModel, fits_in_memory, kv_capacity_tokens
from phaselens.advisor.workload import Workload
from phaselens.phase import Phase

#: Colocated chunk budgets screened (tokens per step); ``0`` means no chunking (whole prompts).
CHUNK_BUDGETS = (512, 1024, 2048, 4096, 8192, 0)
#: Prefill pool sizes whose TTFT tail the screen models; a larger pool takes the largest one's per-instance
#: goodput (conservative: pooling only gains with size).
PREFILL_POOL_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: Conditional-disaggregation thresholds: these quantiles of the effective prompt length.
THRESHOLD_QUANTILES = (0.5, 0.75, 0.9)
SCREEN_SAMPLES = 1000
_BISECT_ITERS = 28


@dataclass(frozen=True)
class Placement:
    """One way to use the GPUs."""

    kind: str  # "colocated" | "split" | "conditional"
    n_p: int = 0
    tp_p: int = 0
    #: decode pool (split) or colocated pool (colocated, conditional)
    n_d: int = 0
    tp_d: int = 0
    chunk: int | None = None
    threshold: int | None = None

    @property
    def gpus(self) -> int:
        return self.n_p * self.tp_p + self.n_d * self.tp_d

    @property
    def label(self) -> str:
        chunk = "" if self.chunk is None else (" no-chunk" if self.chunk == 0 else f" chunk {self.chunk}")
        if self.kind == "colocated":
            return f"colocated {self.n_d}xTP{self.tp_d}{chunk}"
        if self.kind == "split":
            return f"split P {self.n_p}xTP{self.tp_p} : D {self.n_d}xTP{self.tp_d}"
        return (f"conditional >{self.threshold} tok: P {self.n_p}xTP{self.tp_p} : "
                f"C {self.n_d}xTP{self.tp_d}{chunk}")

    def pools(self) -> dict[str, int]:
        """GPUs per pool (for the ``phaselens_advisor_recommended_gpus`` metric)."""
        if self.kind == "colocated":
            return {"colocated": self.gpus}
        if self.kind == "split":
            return {"prefill": self.n_p * self.tp_p, "decode": self.n_d * self.tp_d}
        return {"prefill": self.n_p * self.tp_p, "colocated": self.n_d * self.tp_d}

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "label": self.label,
            "gpus": self.gpus,
            "prefill_instances": self.n_p,
            "prefill_tp": self.tp_p,
            "decode_instances": self.n_d,
            "decode_tp": self.tp_d,
            "chunk_budget": self.chunk,
            "threshold_tokens": self.threshold,
        }


@dataclass
class Candidate:
    """A placement with its closed-form goodput."""

    placement: Placement
    goodput: float
    #: goodput per GPU of this placement's GPUs
    per_gpu: float
    #: per GPU with fractional instance counts (no integer rounding): the shape's best ratio
    ideal_per_gpu: float
    #: what binds first at the goodput: "prefill TTFT", "decode TPOT", "KV memory", "KV link", ...
    limit: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.placement.to_dict(),
            "goodput_rps": self.goodput,
            "goodput_per_gpu": self.per_gpu,
            "ideal_per_gpu": self.ideal_per_gpu,
            "limit": self.limit,
            "details": self.details,
        }


@dataclass
class InstanceFit:
    """Goodput of one instance shape in req/s of the whole stream routed to it, and what binds."""

    goodput: float
    limit: str
    details: dict[str, Any] = field(default_factory=dict)


def erlang_c(servers: int, offered: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with ``offered`` = lambda E[S] erlangs
    (1 at or above saturation); Erlang B by its stable recursion, then C = B / (1 - rho (1 - B))."""
    if offered <= 0:
        return 0.0
    rho = offered / servers
    if rho >= 1:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered * b / (k + offered * b)
    return b / (1.0 - rho * (1.0 - b))


def pool_size_modelled(n: int) -> int:
    """The largest of :data:`PREFILL_POOL_SIZES` not above ``n``."""
    return max(c for c in PREFILL_POOL_SIZES if c <= max(n, 1))


def pk_mean_wait(rate: float, s_mean: float, s2_mean: float) -> float:
    """Pollaczek-Khinchine mean wait of an M/G/1 queue (inf at or above saturation)."""
    rho = rate * s_mean
    return math.inf if rho >= 1 else rate * s2_mean / (2.0 * (1.0 - rho))


class Screen:
    """Closed-form evaluation of instance shapes and placements for one workload, SLO and cluster."""

    def __init__(
        self,
        model: StepModel,
        workload: Workload,
        slo: Slo,
        cluster: Cluster,
        *,
        samples: int = SCREEN_SAMPLES,
        seed: int = 0,
    ):
        self.model = model
        self.workload = workload
        self.slo = slo
        self.cluster = cluster
        rng = np.random.default_rng(seed)
        n = min(samples, workload.n) if workload.n >= samples else samples
        idx = rng.integers(0, workload.n, size=n) if workload.n != n else np.arange(n)
        self.prompt = workload.prompt_tokens[idx].astype(float)
        self.out = workload.output_tokens[idx].astype(float)
        self.l_split = workload.effective_prompt(True)[idx].astype(float)
        self.l_colo = workload.effective_prompt(False)[idx].astype(float)
        self.c_split = self.prompt - self.l_split
        self.c_colo = self.prompt - self.l_colo
        self.steps = np.maximum(self.out - 1.0, 0.0)  # decode steps after the first token
        self.kv_bytes = self.prompt * cluster.model.kv_bytes_per_token(cluster.dtype_bytes)
        # common random numbers for the tail estimates
        self.u = rng.random(n)
        self.e = rng.exponential(1.0, n)
        self.u2 = rng.random(n)
        self.e2 = rng.exponential(1.0, n)
        self.z = rng.standard_normal(n)
        self.q_ttft = slo.ttft_pct / 100.0
        self.q_tpot = slo.tpot_pct / 100.0
        self._cache: dict[tuple, InstanceFit] = {}

    # ------------------------------------------------------------------ per-instance models

    def _co(self, tp: int) -> StepCoefficients:
        return self.model.coefficients(tp)

    def _wait_samples(
        self, rate: float, s: np.ndarray, u: np.ndarray, e: np.ndarray, servers: int = 1
    ) -> tuple[np.ndarray, float]:
        """Per-request M/G/c waits (common random numbers) and the per-server utilisation; ``rate`` is the
        whole pool's. For one server this is the M/G/1 form (wait with probability rho)."""
        if len(s) == 0 or rate <= 0:
            return np.zeros(len(u)), 0.0
        s_mean = float(s.mean())
        rho = rate * s_mean / servers
        if rho >= 1:
            return np.full(len(u), math.inf), rho
        p_wait = erlang_c(servers, rate * s_mean)  # rho for one server
        scv = float((s * s).mean()) / (s_mean * s_mean)  # 1 + cv^2
        mean_w = p_wait * s_mean / (servers * (1.0 - rho)) * scv / 2.0
        return np.where(u < p_wait, e * mean_w / max(p_wait, 1e-300), 0.0), rho

    def _prefill_a(self, tp: int) -> float:
        """A prefill step's fixed time: the fitted intercept plus the host gap before a one-prompt step."""
        co = self._co(tp)
        return co.prefill.a + co.host.before(Phase.PREFILL, 1)

    def prefill_service(self, tp: int, mask: np.ndarray | None = None) -> np.ndarray:
        co = self._co(tp)
        n = self.l_split if mask is None else self.l_split[mask]
        c = self.c_split if mask is None else self.c_split[mask]
        # a prompt over the engine's token budget takes a step per chunk, each with its fixed time
        budget = self.cluster.chunk_budget
        steps = np.ceil(n / budget) if budget else 1.0
        return self._prefill_a(tp) * steps + co.prefill.b * n + co.prefill.c * (n * n + 2 * n * c)

    def prefill_ttft(
        self, tp: int, rate: float, mask: np.ndarray | None = None, servers: int = 1
    ) -> tuple[float, dict[str, Any]]:
        """TTFT quantile of a pool of ``servers`` prefill instances receiving ``rate`` req/s of the stream
        (``mask``: its share).

        Queued prompts are batched into one step, so a step's intercept is shared: at mean batch ``k`` (one
        plus the arrivals at an instance during a step) each prompt loads its instance with ``work + a / k``;
        its own TTFT is at least a whole step, ``a + work``.
        """
        a = self._prefill_a(tp)
        share = 1.0 if mask is None else float(mask.mean())
        full = self.prefill_service(tp, mask)
        work = full - a
        lam = rate * share
        k = 1.0 + lam / servers * float(full.mean())
        load = work + a / k
        m = slice(None) if mask is None else mask
        w, rho = self._wait_samples(lam, load, self.u[m], self.e[m], servers)
        ttft = w + full + self.cluster.ttft_overhead_s
        return float(np.quantile(ttft, self.q_ttft, method="higher")), {
            "prefill_utilization": rho,
            "mean_batch": k,
            "ttft_mean_s": float(ttft.mean()),
        }

    def prefill_mean_ttft(self, tp: int, rate: float) -> float:
        """Exact mean TTFT of the M/G/1 prefill queue (Pollaczek-Khinchine), for the simulator check."""
        s = self.prefill_service(tp)
        return (
            pk_mean_wait(rate, float(s.mean()), float((s * s).mean()))
            + float(s.mean())
            + self.cluster.ttft_overhead_s
        )

    def decode_eval(
        self, tp: int, rate: float, *, local: np.ndarray | None, chunk: int | None
    ) -> tuple[float, float, dict[str, Any]]:
        """``(ttft_q, tpot_q, details)`` of an instance that decodes every request routed to it and prefills
        the ``local`` ones itself (colocated); the others' KV arrives over its link. ``local=None``: none."""
        co = self._co(tp)
        cl = self.cluster
        n = len(self.out)
        local_mask = np.zeros(n, bool) if local is None else local
        remote = ~local_mask
        steps = self.steps
        e_steps = float(steps.mean())
        ctx_life = self.prompt + 1.0 + steps / 2.0
        ctx_mean = float((steps * ctx_life).sum() / max(steps.sum(), 1e-9))
        # prefill work a colocated step absorbs per local request (the intercept is the step's own)
        l, c = self.l_colo, self.c_colo
        if co.mixed is not None:
            _, bp, cp, _, _ = co.mixed
        else:
            bp, cp = co.prefill.b, co.prefill.c
        # a chunk makes a decode step a mixed one: its host gap is longer by the lines' intercepts
        h_mix = max(0.0, co.host.mixed[0] - co.host.decode[0])
        chunks = np.ceil(l / chunk) if chunk else np.ones_like(l)
        work = np.where(local_mask, bp * l + cp * (l * l + 2 * l * c) + h_mix * chunks, 0.0)
        u_p = rate * float(work.mean())
        details: dict[str, Any] = {"prefill_work_share": u_p}
        if u_p >= 1:
            return math.inf, math.inf, {**details, "limit": "colocated prefill work"}
        # Little's law fixed point for the running batch
        t = co.decode_step(1.0, ctx_mean)
        batch = 0.0
        for _ in range(80):
            batch = rate * e_steps * t
            d = co.decode_step(max(batch, 1e-9), batch * ctx_mean)
            t_new = d / (1.0 - u_p)
            if not math.isfinite(t_new) or t_new > 60.0:
                return math.inf, math.inf, {**details, "limit": "decode batch diverges"}
            if abs(t_new - t) <= 1e-9 + 1e-7 * t:
                t = t_new
                break
            t = t_new
        else:
            return math.inf, math.inf, {**details, "limit": "decode batch diverges"}
        d_n = t * (1.0 - u_p)
        batch = rate * e_steps * t
        capacity = kv_capacity_tokens(cl.model, cl.gpu, tp, cl.dtype_bytes, cl.memory_utilization)
        kv_need = batch * ctx_mean
        details.update({"step_s": t, "batch": batch, "kv_tokens": kv_need, "kv_capacity_tokens": capacity})
        if kv_need > cl.kv_high_watermark * capacity:
            return math.inf, math.inf, {**details, "limit": "KV memory"}
        if cl.max_num_seqs is not None and batch > cl.max_num_seqs:
            # the engine runs at most max_num_seqs sequences: past that, requests queue between tokens
            return math.inf, math.inf, {**details, "limit": "max sequences"}
        # KV link (remote requests): M/G/1 of transfers on this instance's link
        x = np.where(remote, self.kv_bytes / (cl.link_bytes_per_s * tp), 0.0)
        link_load = rate * float(x.mean())
        details["link_load"] = link_load
        if link_load >= 1:
            return math.inf, math.inf, {**details, "limit": "KV link"}
        w_link = 0.0
        if link_load > 0:
            mean_wl = rate * float((x * x).mean()) / (2 * (1 - link_load))
            w_link_s = np.where(self.u2 < link_load, self.e2 * mean_wl / link_load, 0.0)
        else:
            w_link_s = np.zeros(n)
        exposed = np.where(remote, w_link_s + x, 0.0)
        details["kv_transfer_mean_s"] = float(x[remote].mean()) if remote.any() else 0.0
        details["kv_exposed_mean_s"] = float(exposed[remote].mean()) if remote.any() else 0.0
        _ = w_link
        # TPOT per request: steps of d(N), the prefill work landing during its life, its own KV hand-off
        has = steps >= 1
        k = np.maximum(steps, 1.0)
        ew2 = float((work * work).mean())
        mu = u_p * t  # prefill work per step on average
        sigma = np.sqrt(np.maximum(rate * k * t * ew2, 0.0)) / k
        tpot = d_n + mu + self.z * sigma + exposed / k
        tpot_q = float(np.quantile(tpot[has], self.q_tpot, method="higher")) if has.any() else 0.0
        details["tpot_mean_s"] = float(tpot[has].mean()) if has.any() else 0.0
        # TTFT of local prefills: M/G/1 wait + the steps the prompt takes
        ttft_q = 0.0
        if local_mask.any():
            lw = work[local_mask]
            ll = l[local_mask]
            if chunk:
                # decodes first; prefill chunks share the rest of each step's budget
                per_step = max(1.0, chunk - batch)
                load = ll / per_step * d_n + lw
                floor = d_n + lw
            else:
                # whole prompts in prefill-only steps (decodes wait), batched up to the simulator's limit
                a = self._prefill_a(tp)
                load = a * ll / 16384.0 + lw
                floor = a + lw
            share = float(local_mask.mean())
            w, rho = self._wait_samples(rate * share, load, self.u[local_mask], self.e[local_mask])
            if rho >= 1:
                return math.inf, tpot_q, {**details, "limit": "colocated prefill queue"}
            ttft = w + np.maximum(load, floor) + cl.ttft_overhead_s
            ttft_q = float(np.quantile(ttft, self.q_ttft, method="higher"))
            details["prefill_utilization"] = rho
            details["ttft_mean_s"] = float(ttft.mean())
        return ttft_q, tpot_q, details

    # ------------------------------------------------------------------ instance goodput

    def _bisect(self, ok: Callable[[float], bool], hi: float) -> float:
        lo = 0.0
        if hi <= 0 or not ok(hi * 1e-4):
            return 0.0
        lo = hi * 1e-4
        for _ in range(_BISECT_ITERS):
            mid = 0.5 * (lo + hi)
            if ok(mid):
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-3 * hi:
                break
        return lo

    def prefill_goodput(self, tp: int, mask: np.ndarray | None = None, instances: int = 1) -> InstanceFit:
        """Goodput per instance of a pool of ``instances`` prefill instances (the pool's over its size;
        pools past :data:`PREFILL_POOL_SIZES` take the largest modelled one's)."""
        servers = pool_size_modelled(instances)
        key = ("P", tp, servers, None if mask is None else mask.tobytes())
        if key in self._cache:
            return self._cache[key]
        share = 1.0 if mask is None else float(mask.mean())
        s = self.prefill_service(tp, mask)
        if share == 0 or len(s) == 0:
            fit = InstanceFit(math.inf, "no traffic")
        else:
            hi = servers / (float(s.mean() - self._co(tp).prefill.a) * share + 1e-12)
            g = self._bisect(lambda r: self.prefill_ttft(tp, r, mask, servers)[0] <= self.slo.ttft_s, hi)
            _, det = self.prefill_ttft(tp, g, mask, servers) if g > 0 else (0.0, {})
            fit = InstanceFit(g / servers, "prefill TTFT",
                              {**det, "service_mean_s": float(s.mean()), "pool_modelled": servers})
        self._cache[key] = fit
        return fit

    def decode_goodput(
        self, tp: int, *, local: np.ndarray | None = None, chunk: int | None = None
    ) -> InstanceFit:
        key = ("D", tp, chunk, None if local is None else local.tobytes())
        if key in self._cache:
            return self._cache[key]
        co = self._co(tp)
        e_steps = max(float(self.steps.mean()), 1e-9)
        # far above any batch the step model allows
        hi = 1.0 / (e_steps * max(co.decode_step(1.0, 0.0), 1e-6)) * 64
        if local is not None and local.any():
            n = self.l_colo[local]
            hi = min(hi, 1.0 / max(float((co.prefill.b * n).mean()) * float(local.mean()), 1e-12))

        def ok(r: float) -> bool:
            ttft_q, tpot_q, _ = self.decode_eval(tp, r, local=local, chunk=chunk)
            return tpot_q <= self.slo.tpot_s and ttft_q <= self.slo.ttft_s

        g = self._bisect(ok, hi)
        limit = "decode TPOT"
        details: dict[str, Any] = {}
        if g > 0:
            _, _, details = self.decode_eval(tp, g, local=local, chunk=chunk)
            over = self.decode_eval(tp, g * 1.01 + 1e-9, local=local, chunk=chunk)
            limit = over[2].get("limit") or ("TTFT" if over[0] > self.slo.ttft_s else "decode TPOT")
            if local is not None and limit == "decode TPOT" and over[0] > self.slo.ttft_s:
                limit = "colocated TTFT"
        else:
            t0, p0, d0 = self.decode_eval(tp, hi * 1e-4, local=local, chunk=chunk)
            limit = d0.get("limit") or ("TTFT at zero load" if t0 > self.slo.ttft_s else "TPOT at zero load")
            details = d0
        fit = InstanceFit(g, limit, details)
        self._cache[key] = fit
        return fit

    # ------------------------------------------------------------------ placements

    def usable_tp(self) -> list[int]:
        cl = self.cluster
        return [
            tp
            for tp in cl.candidate_tp()
            if tp in self.model.by_tp and fits_in_memory(cl.model, cl.gpu, tp, cl.dtype_bytes)
        ]

    def chunk_budgets(self, default: tuple[int, ...]) -> tuple[int, ...]:
        """The colocated chunk budgets to consider: the engine's own when the cluster fixes it."""
        return default if self.cluster.chunk_budget is None else (self.cluster.chunk_budget,)

    def colocated(self) -> list[Candidate]:
        out = []
        g_total = self.cluster.gpus
        everyone = np.ones(len(self.out), bool)
        for tp in self.usable_tp():
            if tp > g_total:
                continue
            for chunk in self.chunk_budgets(CHUNK_BUDGETS):
                fit = self.decode_goodput(tp, local=everyone, chunk=chunk)
                n = g_total // tp
                pl = Placement("colocated", n_d=n, tp_d=tp, chunk=chunk)
                out.append(
                    Candidate(pl, n * fit.goodput, fit.goodput / tp, fit.goodput / tp, fit.limit, fit.details)
                )
        return sorted(out, key=lambda c: -c.per_gpu)

    def split(self) -> list[Candidate]:
        """The best integer split per (prefill TP, decode TP) pair within the cluster."""
        out = []
        for tp_p in self.usable_tp():
            def fp(n: int, tp_p: int = tp_p) -> InstanceFit:
                return self.prefill_goodput(tp_p, instances=n)

            for tp_d in self.usable_tp():
                fd = self.decode_goodput(tp_d)
                cand = self._best_pair("split", tp_p, fp, tp_d, fd)
                if cand is not None:
                    out.append(cand)
        return sorted(out, key=lambda c: -c.per_gpu)

    def conditional(self) -> list[Candidate]:
        out = []
        for q in THRESHOLD_QUANTILES:
            theta = int(np.quantile(self.l_split, q))
            long_mask = self.l_split > theta
            if not long_mask.any() or long_mask.all():
                continue
            best: Candidate | None = None
            for tp_p in self.usable_tp():
                def fp(n: int, tp_p: int = tp_p, long_mask: np.ndarray = long_mask) -> InstanceFit:
                    return self.prefill_goodput(tp_p, long_mask, instances=n)

                for tp_c in self.usable_tp():
                    for chunk in self.chunk_budgets((2048, 0)):
                        fc = self.decode_goodput(tp_c, local=~long_mask, chunk=chunk)
                        cand = self._best_pair(
                            "conditional", tp_p, fp, tp_c, fc, chunk=chunk, threshold=theta
                        )
                        if cand is not None and (best is None or cand.per_gpu > best.per_gpu):
                            best = cand
            if best is not None:
                out.append(best)
        return sorted(out, key=lambda c: -c.per_gpu)

    def _best_pair(
        self,
        kind: str,
        tp_p: int,
        fp: Callable[[int], InstanceFit],
        tp_d: int,
        fd: InstanceFit,
        *,
        chunk: int | None = None,
        threshold: int | None = None,
    ) -> Candidate | None:
        """The best integer split of the cluster for this pair of shapes; ``fp(n)``: the prefill fit per
        instance of a pool of ``n``."""
        gd = fd.goodput
        g_total = self.cluster.gpus
        if fp(1).goodput <= 0 or gd <= 0 or tp_p + tp_d > g_total:
            return None
        n_p = np.arange(1, (g_total - tp_d) // tp_p + 1)
        if len(n_p) == 0:
            return None
        fits = {c: fp(c) for c in {pool_size_modelled(int(n)) for n in n_p}}
        gp = np.array([fits[pool_size_modelled(int(n))].goodput for n in n_p])
        remaining = (g_total - n_p * tp_p) // tp_d
        need = np.ceil(n_p * gp / gd - 1e-9) if np.isfinite(gp).all() else np.ones_like(n_p)
        best: tuple[float, float, int, int] | None = None
        for n_d in (np.minimum(need, remaining), np.minimum(np.maximum(need - 1, 1), remaining)):
            n_d = n_d.astype(int)
            good = np.minimum(n_p * gp, n_d * gd)
            per = good / (n_p * tp_p + n_d * tp_d)
            i = int(np.argmax(per + 1e-12 * good))
            if best is None or per[i] > best[0] + 1e-12:
                best = (float(per[i]), float(good[i]), int(n_p[i]), int(n_d[i]))
        assert best is not None
        return self.pair_candidate(kind, tp_p, fits[pool_size_modelled(best[2])], tp_d, fd, best[2], best[3],
                                   chunk=chunk, threshold=threshold)

    def split_candidate(self, tp_p: int, n_p: int, tp_d: int, n_d: int) -> Candidate:
        """The candidate of exactly ``n_p`` TP-``tp_p`` prefill and ``n_d`` TP-``tp_d`` decode instances (the
        prefill fit of a pool of ``n_p``), whether or not :meth:`split` would pick it: on the split it picks,
        the same candidate, so a placement it passed over is simulated from the same kind of starting point
        (``Search.sim_goodput`` brackets from the candidate's goodput)."""
        return self.pair_candidate("split", tp_p, self.prefill_goodput(tp_p, instances=n_p), tp_d,
                                   self.decode_goodput(tp_d), n_p, n_d)

    @staticmethod
    def pair_candidate(
        kind: str,
        tp_p: int,
        fp: InstanceFit,
        tp_d: int,
        fd: InstanceFit,
        n_p: int,
        n_d: int,
        *,
        chunk: int | None = None,
        threshold: int | None = None,
    ) -> Candidate:
        """The candidate of exactly ``n_p`` prefill and ``n_d`` decode instances (the pools' smaller rate;
        per GPU over all of theirs; ``ideal``: fractional pools)."""
        gp, gd = fp.goodput, fd.goodput
        good = min(n_p * gp, n_d * gd) if gp > 0 and gd > 0 else 0.0
        ideal = (1.0 / (tp_p / gp + tp_d / gd) if math.isfinite(gp) else gd / tp_d) if gp > 0 and gd > 0 \
            else 0.0
        limit = fp.limit if n_p * gp <= n_d * gd else fd.limit
        pl = Placement(kind, n_p=n_p, tp_p=tp_p, n_d=n_d, tp_d=tp_d, chunk=chunk, threshold=threshold)
        details = {
            "prefill_instance_goodput": gp,
            "decode_instance_goodput": gd,
            "prefill": fp.details,
            "decode": fd.details,
        }
        return Candidate(pl, good, good / (n_p * tp_p + n_d * tp_d), ideal, limit, details)

    def gpus_needed(self, rate: float, cand: Candidate) -> int | None:
        """GPUs the candidate's instance shapes need to serve ``rate`` req/s (any cluster size)."""
        pl = cand.placement
        if pl.kind == "colocated":
            g = cand.goodput / max(pl.n_d, 1)
            return None if g <= 0 else math.ceil(rate / g - 1e-9) * pl.tp_d
        gp = cand.details.get("prefill_instance_goodput", 0.0)
        gd = cand.details.get("decode_instance_goodput", 0.0)
        if gp <= 0 or gd <= 0:
            return None
        n_p = 0 if not math.isfinite(gp) else math.ceil(rate / gp - 1e-9)
        return n_p * pl.tp_p + math.ceil(rate / gd - 1e-9) * pl.tp_d
