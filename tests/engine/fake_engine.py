"""A test double of ``LLMEngine`` (docs/contracts.md) for front-end and worker-process tests.

Deterministic and torch-free, so a worker process running it starts in a fraction of a second. Built in
the worker by ``build`` (``WorkerConfig.engine_factory = "tests.engine.fake_engine:build"``); knobs come
from ``engine_args``: ``step_s`` (each step sleeps this long, to hold requests in flight), ``fail_start``
(raise at construction), ``max_model_len``, ``num_kv_blocks``, ``block_size``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from phaselens.engine.config import preset
from phaselens.engine.tokenizer import ByteTokenizer
from phaselens.phase import Phase


@dataclass
class FakeOutput:
    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    num_preemptions: int = 0
    steps_by_phase: dict = field(default_factory=dict)
    step_seconds_by_phase: dict = field(default_factory=dict)


class FakeEngine:
    """Every step gives each request one token: ``"a"`` then ``"b"``, ... cycling through the alphabet."""

    def __init__(self, step_s: float = 0.0, max_model_len: int = 256, num_kv_blocks: int = 64,
                 block_size: int = 16, fail_start: bool = False):
        if fail_start:
            raise ValueError("fake engine told to fail at start-up")
        self.tokenizer = ByteTokenizer()
        self.model_config = preset("tiny")
        self.max_model_len = max_model_len
        self.step_s = step_s
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.reqs: dict[str, dict] = {}
        self.steps = {p: 0 for p in Phase.busy()}
        self.secs = {p: 0.0 for p in Phase.busy()}

    def _blocks(self, req: dict) -> int:
        return -(-(len(req["prompt"]) + len(req["out"])) // self.block_size)

    def add_request(self, request_id, prompt_token_ids, params, arrival_ns=None) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt + max_tokens exceeds the context of {self.max_model_len} tokens")
        self.reqs[request_id] = {"prompt": list(prompt_token_ids), "params": params, "out": []}

    def abort_request(self, request_id) -> None:
        self.reqs.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs)

    def step(self) -> list[FakeOutput]:
        t0 = time.perf_counter()
        if self.step_s:
            time.sleep(self.step_s)
        phase = Phase.DECODE if all(r["out"] for r in self.reqs.values()) else Phase.PREFILL
        outs = []
        for rid, req in list(self.reqs.items()):
            tok = ord("a") + len(req["out"]) % 26
            req["out"].append(tok)
            done = len(req["out"]) >= req["params"].max_tokens
            if done:
                del self.reqs[rid]
            outs.append(FakeOutput(rid, [tok], list(req["out"]), bytes(req["out"]).decode(), done,
                                   "length" if done else None, len(req["prompt"]), 0))
        self.steps[phase] += 1
        self.secs[phase] += time.perf_counter() - t0
        return outs

    def stats(self) -> FakeStats:
        used = sum(self._blocks(r) for r in self.reqs.values())
        return FakeStats(num_running=len(self.reqs), num_waiting=0, kv_usage=used / self.num_kv_blocks,
                         steps_by_phase=dict(self.steps), step_seconds_by_phase=dict(self.secs))


def build(config) -> FakeEngine:
    """The worker-process factory."""
    keys = ("step_s", "max_model_len", "num_kv_blocks", "block_size", "fail_start")
    return FakeEngine(**{k: v for k, v in config.engine_args.items() if k in keys})
