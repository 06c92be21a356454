"""The Llama model: shapes of every preset, RoPE scaling, sane random init, paged == dense."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from phaselens.engine.config import PRESETS, RopeScaling, preset
from phaselens.engine.model import LlamaModel, rope_inv_freq
from phaselens.kernels import AttentionMetadata


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_with_the_published_parameter_count(name: str) -> None:
    cfg = preset(name)
    model = LlamaModel(cfg, device="meta", max_positions=16)  # shapes only, no memory
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_parameters()
    expected = {"llama-3.2-1b": 1.24e9, "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9}
    if name in expected:
        assert n == pytest.approx(expected[name], rel=0.01)


def test_llama3_rope_scaling_keeps_high_and_slows_low_frequencies() -> None:
    sc = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)
    base = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, sc)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8)
    mid = ~high & ~low
    # in between: interpolated, so between the two
    assert torch.all(scaled[mid] <= base[mid]) and torch.all(scaled[mid] >= base[mid] / 8)
    # and continuous at the band's edges (a smooth interpolation, HF's formula)
    smooth = (8192 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    torch.testing.assert_close(scaled[mid], (1 - smooth) * base[mid] / 8 + smooth * base[mid])


def test_random_init_keeps_activations_sane_through_many_layers() -> None:
    deep = replace(preset("tiny"), name="deep", num_layers=48)
    model = LlamaModel.random(deep, seed=3)
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))
    logits = model.forward_dense(ids)
    assert torch.isfinite(logits).all()
    std = logits.std(dim=-1)
    # logits of order one: neither collapsed (uniform output) nor exploding (one-hot output)
    assert 0.3 < float(std.min()) and float(std.max()) < 5.0
    probs = logits.softmax(-1).max(-1).values
    assert float(probs.median()) < 0.5


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a = LlamaModel.random(preset("tiny"), seed=1)
    b = LlamaModel.random(preset("tiny"), seed=1)
    c = LlamaModel.random(preset("tiny"), seed=2)
    assert torch.equal(a.layers[1].mlp.down_proj, b.layers[1].mlp.down_proj)
    assert not torch.equal(a.layers[1].mlp.down_proj, c.layers[1].mlp.down_proj)


def _contiguous_meta(context: int, chunk: int, bs: int) -> AttentionMetadata:
    """One sequence whose blocks are 0, 1, 2, ... (a trivial block table)."""
    nb = -(-(context + chunk) // bs)
    pos = torch.arange(context, context + chunk)
    return AttentionMetadata(block_size=bs, num_decodes=1 if chunk == 1 and context else 0,
                             query_lens=[chunk], context_lens=[context], slot_mapping=pos,
                             block_tables=torch.arange(nb)[None, :],
                             decode_seq_lens=torch.tensor([context + 1]))


def test_paged_forward_in_chunks_equals_dense_forward() -> None:
    cfg = preset("tiny")
    model = LlamaModel.random(cfg, seed=0)
    bs = 4
    ids = torch.randint(0, 256, (23,), generator=torch.Generator().manual_seed(5))
    ref = model.forward_dense(ids)
    cache = torch.zeros(cfg.num_layers, 2, 8, bs, cfg.num_kv_heads, cfg.head_dim)
    done = 0
    for chunk in (7, 1, 9, 1, 1, 4):  # prefill chunks over cached prefixes, and decodes
        meta = _contiguous_meta(done, chunk, bs)
        pos = torch.arange(done, done + chunk)
        hidden = model(ids[done:done + chunk], pos, meta, cache)
        torch.testing.assert_close(model.compute_logits(hidden), ref[done:done + chunk], rtol=1e-4, atol=1e-4)
        done += chunk
    assert done == len(ids)


def test_hf_state_dict_round_trip() -> None:
    a = LlamaModel.random(preset("tiny"), seed=1)
    b = LlamaModel(preset("tiny"))
    b.load_hf_state_dict(a.hf_state_dict())
    ids = torch.arange(10)
    torch.testing.assert_close(a.forward_dense(ids), b.forward_dense(ids), rtol=0, atol=0)
    bad = a.hf_state_dict()
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        b.load_hf_state_dict(bad, source="x")
