"""Token sampling: greedy, temperature, top-k, top-p, with a random stream per request."""

from __future__ import annotations

import torch

from phaselens.engine.sampling_params import SamplingParams


class Sampler:
    """Picks one token per row of logits, each row under its own request's parameters."""

    def sample(self, logits: torch.Tensor, params: list[SamplingParams],
               generators: list[torch.Generator | None]) -> torch.Tensor:
        """Token ids ``[rows]`` (int64, on the logits' device); no host synchronization.

        Non-greedy rows draw by the exponential race (``argmax p / E`` with ``E ~ Exp(1)`` is a draw from
        ``p``), so each row uses only its own generator and a seeded request gives the same tokens
        whatever else shares its batch.
        """
        greedy = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return greedy
        dev = logits.device
        vocab = logits.shape[-1]
        # per-row parameters in two pinned host tensors, copied without blocking the host; a top_k past the
        # vocabulary cuts nothing, and clamped it always fits the int64 tensor (2**63 would not)
        top_ks = [min(params[i].top_k or vocab, vocab) for i in random_rows]
        ints = _to(dev, [random_rows, top_ks], torch.int64)
        floats = _to(dev, [[params[i].temperature for i in random_rows],
                           [params[i].top_p for i in random_rows]], logits.dtype)
        idx, ks = ints[0], ints[1]
        temps, top_ps = floats[0], floats[1]
        rows = logits[idx] / temps[:, None]
        sorted_logits, order = rows.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= ks[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the ones ranked above it already reach top_p (the first one always stays)
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_ps[:, None], 0.0)
        noise = torch.empty_like(probs)
        for r, i in enumerate(random_rows):
            noise[r].exponential_(generator=generators[i])
        choice = (probs / noise).argmax(dim=-1)
        tokens = order.gather(1, choice[:, None]).squeeze(1)
        return greedy.index_copy(0, idx, tokens)


def _to(device: torch.device, rows: list[list], dtype: torch.dtype) -> torch.Tensor:
    """A small host table on ``device``: pinned and non-blocking on CUDA (a pageable copy would sync)."""
    cuda = device.type == "cuda"
    return torch.tensor(rows, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)
