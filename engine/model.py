"""The Llama-architecture decoder: RMSNorm, RoPE with Llama-3 frequency scaling, GQA, SwiGLU.

One model serves two forwards over the same weights:

- :meth:`LlamaModel.forward`: the engine's path. It takes the packed tokens of one step (several
  sequences' decode tokens and prefill chunks, flattened), their positions and an
  :class:`~phaselens.kernels.AttentionMetadata`, writes the new keys and values into the paged cache and
  returns hidden states; :meth:`LlamaModel.compute_logits` then runs the head on the rows to sample only.
- :meth:`LlamaModel.forward_dense`: a full recompute of one sequence with plain causal attention and no
  cache, the reference the engine is checked against.

Weights follow Hugging Face's ``LlamaForCausalLM`` (``rotate_half`` RoPE convention, q/k/v and gate/up
stored fused here; :mod:`phaselens.engine.loader` maps HF names). Random weights are seeded and scaled so
that activations stay of order one through any number of layers (see :meth:`LlamaModel.init_random`).
"""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import nn

from phaselens.engine.config import ModelConfig, RopeScaling
from phaselens.kernels import (AttentionMetadata, add_rms_norm, dense_attention, paged_attention, rotate,
                               silu_mul)


class RMSNorm(nn.Module):
    """Root-mean-square norm (``F.rms_norm`` computes in float32 for bf16 inputs, as HF's ``LlamaRMSNorm``
    does; one fused call instead of eight elementwise kernels)."""

    def __init__(self, size: int, eps: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama-3 scaling (HF ``_compute_llama3_parameters``) when given."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly
    scaled = torch.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """cos/sin tables for positions ``0 .. max_positions-1``, applied in the ``rotate_half`` layout by
    ``phaselens.kernels.rotate``."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        inv = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin): the sign lives in the table, one kernel less
        signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
        self.register_buffer("cos", emb.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", signed_sin.to(device=device, dtype=dtype), persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[T, 1, head_dim]`` of ``positions [T]``, looked up once per forward."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _param(*shape: int, device: torch.device, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=False)


class Attention(nn.Module):
    """Grouped-query self-attention with a fused q/k/v projection."""

    def __init__(self, config: ModelConfig, layer: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = _param(self.q_size + 2 * self.kv_size, config.hidden_size, device=device, dtype=dtype)
        self.o_proj = _param(config.hidden_size, self.q_size, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = x.shape[0]
        qkv = F.linear(x, self.qkv_proj)
        # q and k are adjacent in the fused projection: rotate both heads at once
        qk = rotate(qkv[:, :self.q_size + self.kv_size].view(t, -1, self.head_dim), *rope)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.num_kv_heads, self.head_dim)
        return qk[:, :self.num_heads], qk[:, self.num_heads:], v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)
        out = paged_attention(q, k, v, kv_cache[self.layer, 0], kv_cache[self.layer, 1], meta, self.scale)
        return F.linear(out.reshape(x.shape[0], self.q_size), self.o_proj)

    def forward_dense(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self._qkv(x, rope)
        out = dense_attention(q, k, v, self.scale)
        return F.linear(out.reshape(x.shape[0], self.q_size), self.o_proj)


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up_proj = _param(2 * config.intermediate_size, config.hidden_size, device=device,
                                   dtype=dtype)
        self.down_proj = _param(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(silu_mul(F.linear(x, self.gate_up_proj)), self.down_proj)


class DecoderLayer(nn.Module):
    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    mlp: MLP

    def __init__(self, config: ModelConfig, layer: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.self_attn = Attention(config, layer, device, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device, dtype)
        self.mlp = MLP(config, device, dtype)


class LlamaModel(nn.Module):
    """A Llama decoder with its LM head. Build with :meth:`random` or load with the loader."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, max_positions: int | None = None) -> None:
        super().__init__()
        device = torch.device(device)
        if dtype is None:
            dtype = default_dtype(device)
        self.config, self.device, self.dtype = config, device, dtype
        self.max_positions = max_positions or config.max_position_embeddings
        h = config.hidden_size
        self.embed_tokens = _param(config.vocab_size, h, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device, dtype) for i in range(config.num_layers))
        #: the same modules, typed (ModuleList items are plain Modules to a type checker)
        self.decoder_layers = cast(list[DecoderLayer], list(self.layers))
        self.norm = RMSNorm(h, config.rms_norm_eps, device, dtype)
        self.lm_head = (None if config.tie_word_embeddings
                        else _param(config.vocab_size, h, device=device, dtype=dtype))
        self.rotary = Rotary(config, self.max_positions, device, dtype)

    @classmethod
    def random(cls, config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               seed: int = 0, max_positions: int | None = None) -> "LlamaModel":
        """A model with seeded random weights (same seed, device and dtype: same weights)."""
        model = cls(config, device, dtype, max_positions)
        model.init_random(seed)
        return model

    @torch.no_grad()
    def init_random(self, seed: int) -> None:
        """Seeded normal weights, scaled so the residual stream and logits stay of order one.

        Projections into the residual stream get std ``1/sqrt(fan_in * 2 * num_layers)`` (GPT-2's scaled
        init), so the stream's variance grows to about 2 over all layers instead of with their number;
        the others ``1/sqrt(fan_in)``, so each keeps unit variance; embeddings have std 1.
        """
        g = torch.Generator(device=self.device).manual_seed(seed)
        depth = 2 * self.config.num_layers

        def fill(p: torch.Tensor, std: float) -> None:
            p.normal_(0.0, std, generator=g)

        fill(self.embed_tokens, 1.0)
        for layer in self.decoder_layers:
            attn, mlp = layer.self_attn, layer.mlp
            fill(attn.qkv_proj, attn.qkv_proj.shape[1] ** -0.5)
            fill(attn.o_proj, (attn.o_proj.shape[1] * depth) ** -0.5)
            fill(mlp.gate_up_proj, mlp.gate_up_proj.shape[1] ** -0.5)
            fill(mlp.down_proj, (mlp.down_proj.shape[1] * depth) ** -0.5)
        if self.lm_head is not None:
            fill(self.lm_head, self.config.hidden_size ** -0.5)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of one packed step; new K/V go to ``kv_cache``.

        ``kv_cache``: ``[num_layers, 2, num_blocks, block_size, kv_heads, head_dim]``.
        """
        rope = self.rotary.angles(positions)
        return self._decoder(F.embedding(input_ids, self.embed_tokens),
                             lambda layer, h: layer.self_attn(h, rope, meta, kv_cache))

    def _decoder(self, x: torch.Tensor, attend: Callable[[DecoderLayer, torch.Tensor], torch.Tensor]
                 ) -> torch.Tensor:
        """The layers over embeddings ``x``, then the final norm: ``x + attn(norm(x))``, ``x + mlp(norm(x))``.

        Each residual add goes with the norm after it (the next sublayer's, or the final one): one fused
        kernel on CUDA instead of two (kernels/fused.py), the same two torch calls elsewhere."""
        layers = self.decoder_layers
        h, residual = layers[0].input_layernorm(x), x
        for i, layer in enumerate(layers):
            post = layer.post_attention_layernorm
            h, residual = add_rms_norm(attend(layer, h), residual, post.weight, post.eps)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            h, residual = add_rms_norm(layer.mlp(h), residual, nxt.weight, nxt.eps)
        return h

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits of the given hidden rows."""
        return F.linear(hidden, self.head_weight).float()

    @torch.inference_mode()
    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reference: float32 logits ``[L, vocab]`` of one whole sequence, full recompute, no cache."""
        positions = torch.arange(input_ids.shape[0], device=input_ids.device)
        rope = self.rotary.angles(positions)
        hidden = self._decoder(F.embedding(input_ids, self.embed_tokens),
                               lambda layer, h: layer.self_attn.forward_dense(h, rope))
        return self.compute_logits(hidden)

    @torch.inference_mode()
    def greedy_dense(self, prompt: list[int], max_tokens: int, eos_ids: tuple[int, ...] = ()) -> list[int]:
        """Reference greedy generation: recompute the whole sequence for every token."""
        ids = list(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            logits = self.forward_dense(torch.tensor(ids, device=self.device))
            tok = int(logits[-1].argmax())
            out.append(tok)
            ids.append(tok)
            if tok in eos_ids:
                break
        return out

    # -- Hugging Face parameter names

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under ``LlamaForCausalLM`` names (q/k/v and gate/up split apart)."""
        out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed_tokens.data,
                                        "model.norm.weight": self.norm.weight.data}
        if self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head.data
        c = self.config
        for i, layer in enumerate(self.decoder_layers):
            p = f"model.layers.{i}."
            q, k, v = layer.self_attn.qkv_proj.data.split([c.q_size, c.kv_size, c.kv_size])
            gate, up = layer.mlp.gate_up_proj.data.split([c.intermediate_size, c.intermediate_size])
            out.update({
                p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": layer.self_attn.o_proj.data,
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": layer.mlp.down_proj.data,
                p + "input_layernorm.weight": layer.input_layernorm.weight.data,
                p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight.data,
            })
        return out

    @torch.no_grad()
    def load_hf_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Copy HF-named tensors in; ValueError names a missing tensor or a wrong shape and ``source``."""
        c = self.config

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"{source}: missing tensor {name!r}")
            return tensors[name]

        def put(dst: torch.Tensor, *names: str) -> None:
            parts = [get(n) for n in names]
            src = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{source}: tensor {', '.join(names)} has shape {tuple(src.shape)}, "
                                 f"expected {tuple(dst.shape)} for config {c.name!r}")
            dst.copy_(src)

        put(self.embed_tokens, "model.embed_tokens.weight")
        put(self.norm.weight, "model.norm.weight")
        if self.lm_head is not None:
            put(self.lm_head, "lm_head.weight")
        for i, layer in enumerate(self.decoder_layers):
            p = f"model.layers.{i}."
            put(layer.self_attn.qkv_proj, *(p + f"self_attn.{n}_proj.weight" for n in "qkv"))
            put(layer.self_attn.o_proj, p + "self_attn.o_proj.weight")
            put(layer.mlp.gate_up_proj, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            put(layer.mlp.down_proj, p + "mlp.down_proj.weight")
            put(layer.input_layernorm.weight, p + "input_layernorm.weight")
            put(layer.post_attention_layernorm.weight, p + "post_attention_layernorm.weight")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPU, float32 on CPU (DESIGN.md, "The bundled engine")."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
