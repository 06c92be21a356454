"""The engine's front door: requests in, tokens out, one scheduler step at a time.

``LLMEngine.step()`` is the whole serving loop in one call::

    schedule -> pack inputs -> shim.step_begin -> model + sampler -> shim.step_end
             -> read sampled ids (the step's one host sync) -> update sequences
             (the shim emits a step's record during the next step's step_end, or at once when idle)

The API is fixed by docs/contracts.md ("Engine core"); the API server codes against it.

Split-pool mode (issue 6) adds a hand-off at the first token: a request added with ``handoff=True`` is
*parked* once its prompt is in the cache and its first token sampled (blocks kept, out of the batch) and
listed by :meth:`LLMEngine.take_handoffs`; another engine continues it with :meth:`add_transferred`, which
copies only the blocks missing from its own prefix cache (:mod:`kv_transfer`), and the first engine then
frees them with :meth:`release`. :meth:`resume` continues a parked request where it is (no copy).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from phaselens.engine.block_manager import BlockManager
from phaselens.engine.config import ModelConfig
from phaselens.engine.kv_transfer import KVTransfer, TransferResult
from phaselens.engine.protocol import Handoff, KVHandle
from phaselens.engine.loader import resolve
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.scheduler import Scheduler, SchedulerOutput
from phaselens.engine.sequence import Sequence, SequenceStatus
from phaselens.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from phaselens.engine.worker import Worker
from phaselens.phase import Phase, Role

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """How to build an engine (docs/contracts.md). Validated by :class:`LLMEngine` (ValueError)."""

    model: str = "tiny"  # a preset name (engine/config.py) or a local Hugging Face folder
    device: str = "cpu"  # "cpu" or "cuda:N"; bf16 on GPU, float32 on CPU
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    block_size: int = 16
    num_kv_blocks: int | None = None  # CPU: None = a default; GPU: None = sized from free memory
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None  # None: the model's context, capped to what the KV cache holds
    enable_prefix_caching: bool = True
    seed: int = 0
    role: Role = Role.COLOCATED
    engine_id: str = "e0"
    shim_socket_path: str | None = None  # None: the shim's DEFAULT_SOCKET_PATH
    shim_jsonl_path: str | None = None
    shim_enabled: bool = True
    gpu_uuid: str | None = None
    #: CPU only: torch intra-op threads; None = 1 for models under 100M parameters (see worker.py), else
    #: torch's default
    cpu_threads: int | None = None


@dataclass
class RequestOutput:
    """One request's progress after a step (docs/contracts.md)."""

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop" (EOS or stop string), "length", "abort"
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_hit_tokens: int
    prefix_query_tokens: int
    num_preemptions: int
    steps_by_phase: dict[Phase, int] = field(default_factory=dict)
    step_seconds_by_phase: dict[Phase, float] = field(default_factory=dict)
    #: tokens run so far: prompt (and recompute) chunk tokens, and decode tokens
    prefill_tokens: int = 0
    decode_tokens: int = 0
    #: KV blocks: free (unreferenced) and in all; the router's KV-space awareness in split mode
    kv_free_blocks: int = 0
    kv_total_blocks: int = 0
    #: requests parked for a hand-off, their blocks still held
    num_parked: int = 0
    #: the phase shim's step records sent to the agent, and dropped (no agent, a full queue)
    shim_sent: int = 0
    shim_dropped: int = 0


class LLMEngine:
    """A paged, continuously batching engine over one device."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        source = resolve(config.model)
        mc = source.config
        if config.max_model_len is not None and not 1 <= config.max_model_len <= mc.max_position_embeddings:
            raise ValueError(f"max_model_len must be in 1..{mc.max_position_embeddings} for {mc.name}, "
                             f"got {config.max_model_len}")
        max_len = config.max_model_len or mc.max_position_embeddings
        self.tokenizer: Tokenizer = source.tokenizer()
        self.worker = Worker(source, config.device, block_size=config.block_size,
                             num_kv_blocks=config.num_kv_blocks,
                             gpu_memory_utilization=config.gpu_memory_utilization,
                             max_num_batched_tokens=config.max_num_batched_tokens,
                             max_num_seqs=config.max_num_seqs, max_model_len=max_len, seed=config.seed,
                             cpu_threads=config.cpu_threads)
        capacity = self.worker.num_kv_blocks * config.block_size
        if max_len > capacity:
            if config.max_model_len is not None:
                raise ValueError(f"max_model_len={config.max_model_len} does not fit the KV cache "
                                 f"({self.worker.num_kv_blocks} blocks of {config.block_size} = "
                                 f"{capacity} tokens)")
            log.info("max_model_len capped from %d to %d tokens: what the KV cache holds", max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        self.block_manager = BlockManager(self.worker.num_kv_blocks, config.block_size,
                                          config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_batched_tokens, config.max_num_seqs)
        self.shim = self._make_shim()
        self.kv = KVTransfer(config.engine_id, self.worker.kv_cache)
        self._handoffs: list[Handoff] = []
        self._seqs: dict[str, Sequence] = {}
        self._seed_counter = itertools.count()
        self._gen_counter = itertools.count()
        self.steps_by_phase: dict[Phase, int] = {p: 0 for p in Phase.busy()}
        self.step_seconds_by_phase: dict[Phase, float] = {p: 0.0 for p in Phase.busy()}
        self.prefill_tokens = 0
        self.decode_tokens = 0

    def _make_shim(self):  # -> PhaseShim; imported here so the engine module stays light to import
        from phaselens.serving_shim.shim import DEFAULT_SOCKET_PATH, PhaseShim

        c = self.config
        return PhaseShim(self.model_config, gpu_uuid=c.gpu_uuid, engine_id=c.engine_id, role=c.role,
                         device=self.worker.device, dtype_bytes=self.worker.dtype_bytes,
                         socket_path=c.shim_socket_path or DEFAULT_SOCKET_PATH, jsonl_path=c.shim_jsonl_path,
                         enabled=c.shim_enabled)

    @property
    def model_config(self) -> ModelConfig:
        return self.worker.model_config

    # -- requests

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_ns: int | None = None, handoff: bool = False) -> None:
        """Queue a request; ValueError for an empty or too long prompt, bad token ids, a duplicate id.

        ``handoff``: park it after its first token for another engine to continue (split mode).
        """
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary (0..{vocab - 1})")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens + max_tokens {params.max_tokens} = "
                             f"{total} exceeds the context of {self.max_model_len} tokens")
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:  # unseeded: a stream of its own, reproducible for the engine's seed
                seed = hash((self.config.seed, next(self._seed_counter)))
            generator = torch.Generator(device=self.worker.device).manual_seed(seed & (2**63 - 1))
        seq = Sequence(request_id, prompt_token_ids, params, arrival_ns or time.time_ns(), generator)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.handoff = handoff
        self._seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a request and free its KV blocks now (unknown or finished ids are ignored)."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        seq.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- split mode: the KV hand-off

    def kv_handle(self) -> KVHandle:
        """How another worker process opens this engine's KV cache.

        On CPU the first call moves the cache into shared memory (only engines that hand KV over pay for
        a segment): the runner reads the cache from its attribute each step, so swapping it is enough.
        """
        if not self.kv.shared:
            self.worker.kv_cache = self.worker.runner.kv_cache = self.kv.share_cpu()
        return self.kv.handle()

    def set_role(self, role: Role, peers: tuple[KVHandle, ...] = ()) -> None:
        """Take a new role (the shim tags the following steps with it) and open ``peers``' caches now, so
        that a peer this engine cannot read fails the mode change, not a request (KVTransferError)."""
        for handle in peers:
            if handle.worker_id != self.config.engine_id:
                self.kv.open_peer(handle)
        self.config.role = role
        self.shim.role = role

    def take_handoffs(self) -> list[Handoff]:
        """Requests parked since the last call, ready for another engine to continue."""
        out, self._handoffs = self._handoffs, []
        return out

    def release(self, request_id: str) -> None:
        """A parked request was continued elsewhere: free its blocks (they stay in the prefix cache)."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.PARKED:
            return
        del self._seqs[request_id]
        self.scheduler.remove(seq)

    def can_attach(self) -> bool:
        """Whether the batch has room for one more running sequence (``max_num_seqs``): hand-offs wait
        until it has (in split mode a decode worker took every hand-off at once, ran batches of up to 272
        past the 64 its CUDA graphs cover, and each such step cost 13.8 ms instead of 6.4; bench/RESULTS.md,
        issue 8)."""
        return len(self.scheduler.running) < self.scheduler.max_num_seqs

    def resume(self, request_id: str) -> bool:
        """Continue a parked request here, its blocks as they are. False if it is not parked here."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.status is not SequenceStatus.PARKED:
            return False
        seq.handoff = False
        self.scheduler.attach(seq)
        return True

    def add_transferred(self, handoff: Handoff, source: KVHandle) -> TransferResult | None:
        """Continue a request parked in another engine: copy the blocks this engine's prefix cache lacks.

        Returns what moved, or None when too few blocks are free now or the batch is full
        (:meth:`can_attach`; nothing changed: try again later).
        ValueError for a duplicate id or a request that does not fit this engine; KVTransferError when the
        source's cache cannot be read.
        """
        h = handoff
        if h.request_id in self._seqs:
            raise ValueError(f"request id {h.request_id!r} is already in the engine")
        if h.num_prompt_tokens + h.params.max_tokens > self.max_model_len:
            raise ValueError(f"request {h.request_id}: {h.num_prompt_tokens} prompt + {h.params.max_tokens} "
                             f"output tokens exceed this engine's context of {self.max_model_len}")
        computed = h.num_prompt_tokens  # the first output token's KV is computed by the next decode step
        bs = self.block_manager.block_size
        if len(h.block_ids) != self.block_manager.blocks_needed(computed):
            raise ValueError(f"request {h.request_id}: {len(h.block_ids)} source blocks for {computed} "
                             f"tokens of block size {bs}")
        if not self.can_attach():
            return None
        generator = None
        if not h.params.greedy:
            seed = h.params.seed if h.params.seed is not None else hash((self.config.seed, h.request_id))
            generator = torch.Generator(device=self.worker.device).manual_seed(seed & (2**63 - 1))
        seq = Sequence(h.request_id, h.token_ids[:h.num_prompt_tokens], h.params, h.arrival_ns, generator)
        seq.token_ids = list(h.token_ids)
        # the prefix cache is looked up over the computed tokens only: at most the prompt's full blocks
        cached = self.block_manager.cached_prefix(seq)
        if not self.block_manager.allocate(seq, computed - len(cached) * bs, cached):
            return None
        n_cached = len(cached)
        try:
            result = self.kv.pull(source, h.block_ids[n_cached:], seq.block_table[n_cached:], n_cached)
        except Exception:
            self.block_manager.free_seq(seq)
            raise
        seq.num_computed_tokens = computed
        seq.prefill_target = computed
        seq.num_cached_tokens = h.num_cached_tokens
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.text = seq.detokenizer.add(seq.output_token_ids)
        self.block_manager.register_full_blocks(seq)
        self._seqs[h.request_id] = seq
        self.scheduler.attach(seq)
        return result

    # -- the step

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs of the requests that got a token (or finished) in it."""
        out = self.scheduler.schedule()
        phase = out.phase
        if phase is None:
            if self.scheduler.has_unfinished():
                s = self.scheduler
                raise RuntimeError(f"scheduler made no progress with {len(s.waiting)} waiting and "
                                   f"{len(s.running)} running requests")
            return []
        runner = self.worker.runner
        inputs = runner.prepare(out)
        t0 = time.perf_counter()
        self.shim.step_begin()
        sampled_dev = runner.run(out, inputs)
        self.shim.step_end(phase, prefill_seqs=out.prefill_seqs(), decode_ctx=out.decode_ctx())
        sampled = sampled_dev.tolist()  # the step's one host synchronization
        self.steps_by_phase[phase] += 1
        self.step_seconds_by_phase[phase] += time.perf_counter() - t0
        self.decode_tokens += out.num_decodes
        self.prefill_tokens += out.num_tokens - out.num_decodes
        self.scheduler.update(out)
        outputs = self._outputs(out, inputs.sample_index, sampled)
        if not self.has_unfinished_requests():
            # This step's record goes out with the next step's step_end, while that step's kernels run (off
            # the critical path: emitting it here, after the host sync, cost 1-2% of 8B decode throughput on
            # the H100). With no next step coming, it goes out now.
            self.shim.poll()
        return outputs

    def _outputs(self, out: SchedulerOutput, sample_index: list[int],
                 sampled: list[int]) -> list[RequestOutput]:
        """Append each sampled token to its sequence; the request outputs, finished ones taken out."""
        sched = out.scheduled
        return [self._append(sched[i].seq, tok) for i, tok in zip(sample_index, sampled)]

    def _append(self, seq: Sequence, token: int) -> RequestOutput:
        seq.token_ids.append(token)
        params = seq.params
        outputs = seq.output_token_ids  # a new list: it goes into the RequestOutput as it is
        prev_len = len(seq.text)
        det = seq.detokenizer
        assert det is not None  # attached in add_request
        seq.text = det.add(outputs)
        reason, cut = None, False
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            reason = "stop"
        elif params.stop and self._cut_stop(seq, prev_len):
            reason, cut = "stop", True
        elif len(outputs) >= params.max_tokens:
            reason = "length"
        if reason is None and seq.handoff and len(outputs) == 1:
            # split mode: the prompt is in the cache and the first token sampled; a decode worker goes on
            self.scheduler.park(seq)
            self._handoffs.append(Handoff(seq.request_id, list(seq.token_ids), seq.num_prompt_tokens,
                                          seq.num_cached_tokens, params, seq.arrival_ns,
                                          list(seq.block_table)))
        if reason is not None:
            if not cut:  # text held back (a partial character) belongs to the output now
                seq.text = det.flush(outputs)
            seq.finish_reason = reason
            self.scheduler.remove(seq)
            self._seqs.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, [token], outputs, seq.text, seq.finished,
                             seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_tokens)

    @staticmethod
    def _cut_stop(seq: Sequence, prev_len: int) -> bool:
        """Whether the text now contains a stop string; if so cut the text before it."""
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, prev_len - longest + 1)
        found = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not found:
            return False
        seq.text = seq.text[:min(found)]
        return True

    # -- conveniences

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting),
                           kv_usage=self.block_manager.usage, prefix_hit_tokens=s.prefix_hit_tokens,
                           prefix_query_tokens=s.prefix_query_tokens, num_preemptions=s.num_preemptions,
                           steps_by_phase=dict(self.steps_by_phase),
                           step_seconds_by_phase=dict(self.step_seconds_by_phase),
                           prefill_tokens=self.prefill_tokens, decode_tokens=self.decode_tokens,
                           kv_free_blocks=len(self.block_manager.free),
                           kv_total_blocks=self.block_manager.num_blocks,
                           num_parked=sum(1 for q in self._seqs.values()
                                          if q.status is SequenceStatus.PARKED),
                           shim_sent=self.shim.stats.sent, shim_dropped=self.shim.stats.dropped)

    def generate(self, prompts: list[str],
                 params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
        """Offline: tokenize and add every prompt, step until all are done; final outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts")
        ids = [f"gen-{next(self._gen_counter)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, self.tokenizer.encode(prompt), p)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[r] for r in ids]

    def close(self) -> None:
        """Flush and close the phase shim; unmap peers' caches and remove this cache's shared segment."""
        self.shim.close()
        self.kv.close()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
