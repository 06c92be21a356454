"""Sampling parameters of one request, validated at the door (bad values name themselves)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: most stop strings per request
MAX_STOP_STRINGS = 16
#: temperatures below this are greedy: dividing logits by a float that rounds to 0 in the model's dtype
#: (float32, bf16) gives inf/NaN probabilities; vLLM uses the same threshold
GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingParamsError(ValueError):
    """A bad sampling parameter; ``param`` is the field's name (the API's error names it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` (or below ``GREEDY_BELOW_TEMPERATURE``) means greedy.

    ``top_k`` 0 means no top-k cut; a ``top_k`` at least the vocabulary's size cuts nothing either (the
    sampler clamps it), so any integer >= 0 is valid. ``seed`` may be any integer (the engine folds it into
    63 bits).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError("max_tokens",
                                      f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= _float(self.temperature) <= 2.0):
            raise SamplingParamsError("temperature",
                                      f"temperature must be in [0, 2], got {self.temperature!r}")
        if not (0.0 < _float(self.top_p) <= 1.0):
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingParamsError("top_k",
                                      f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingParamsError("seed", f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingParamsError("stop", f"stop must be non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop",
                                      f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def _float(value: object) -> float:
    """``value`` as a float; NaN for what is not a number, so the range checks reject it."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return math.nan
