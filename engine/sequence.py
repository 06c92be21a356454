"""The state of one request inside the engine."""

from __future__ import annotations

import enum

import torch

from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.tokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    #: split mode: prefilled on a prefill worker, blocks held until a decode worker has copied them
    PARKED = "parked"
    FINISHED = "finished"


class Sequence:
    """Tokens, cache position and block table of one request.

    ``num_computed_tokens`` counts the tokens whose keys and values are in the KV cache. A step feeds a
    sequence the tokens from there on; when it reaches ``len(token_ids)`` the step samples the next token.
    ``prefill_target`` is the length the sequence had when it was last admitted: until the cache holds
    that many tokens it is prefilling (a prompt, or prompt and outputs again after a preemption).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_ns: int, generator: torch.Generator | None = None) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival_ns = arrival_ns
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.prefill_target = len(self.token_ids)
        #: KV block ids in token order. Only appended to until the block manager replaces the whole list
        #: (freeing the sequence): the runner keeps a copy between steps and writes only what was appended
        self.block_table: list[int] = []
        #: chained hashes of the full blocks registered in the prefix cache, in order
        self.block_hashes: list[int] = []
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.num_preemptions = 0
        #: split mode: after its first token, park the request for a decode worker instead of decoding it
        self.handoff = False
        self.finish_reason: str | None = None
        self.text = ""
        #: attached by the engine, which knows the tokenizer
        self.detokenizer: IncrementalDetokenizer | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"status={self.status.value})")

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.prefill_target

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
