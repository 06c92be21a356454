"""Model shapes: the Llama-architecture configuration and the named presets (DESIGN.md, "The bundled engine").

The presets reproduce the published shapes of Meta's Llama 3.x models (their ``config.json``) with
seeded random weights; ``tiny`` is ours, small enough to serve a request on 2 CPU cores in well
under a second. A local Hugging Face folder is read with :meth:`ModelConfig.from_hf_config`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# Byte-level tokenizer used by the random-weight presets: ids 0..255 are bytes, then BOS and EOS.
BYTE_VOCAB = 256
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-architecture decoder (RMSNorm, RoPE, GQA, SwiGLU)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int = BYTE_BOS_ID
    eos_token_ids: tuple[int, ...] = (BYTE_EOS_ID,)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model config {self.name!r}: {key} must be > 0, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config {self.name!r}: num_heads ({self.num_heads}) is not a multiple "
                             f"of num_kv_heads ({self.num_kv_heads})")

    # -- sizes used by the cost model and the KV cache

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        h, i = self.hidden_size, self.intermediate_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embed + head + h

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token occupies across all layers (K and V)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra", None)
        return d

    @classmethod
    def from_hf_config(cls, path: str | Path, name: str | None = None) -> "ModelConfig":
        """Read a Hugging Face ``config.json`` of a Llama-architecture model.

        Raises ValueError naming the file and the missing or unsupported field.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no config.json") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object")
        arch = raw.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"{path}: model_type {arch!r} is not supported (only 'llama')")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            scaling = None
            rs = raw.get("rope_scaling")
            if rs:
                kind = rs.get("rope_type", rs.get("type"))
                if kind != "llama3":
                    raise ValueError(f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3')")
                scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
                )
            eos = raw.get("eos_token_id", BYTE_EOS_ID)
            eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
            return cls(
                name=name or path.parent.name,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads", heads)),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                max_position_embeddings=int(raw.get("max_position_embeddings", 8192)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                bos_token_id=int(raw.get("bos_token_id", BYTE_BOS_ID)),
                eos_token_ids=eos_ids,
            )
        except KeyError as exc:
            raise ValueError(f"{path}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if str(exc).startswith(str(path)):
                raise
            raise ValueError(f"{path}: bad value ({exc})") from None


_LLAMA3_SCALING_8K = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)

# Shapes from Meta's published config.json files (Llama 3.2 1B, Llama 3.1 8B and 70B).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        name="tiny", vocab_size=BYTE_VOCAB + 2, hidden_size=64, intermediate_size=176, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048, rope_theta=10000.0,
    ),
    "llama-3.2-1b": ModelConfig(
        name="llama-3.2-1b", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=replace(_LLAMA3_SCALING_8K, factor=32.0), tie_word_embeddings=True,
    ),
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING_8K,
    ),
    "llama-3.1-70b": ModelConfig(
        name="llama-3.1-70b", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING_8K,
    ),
}


def preset(name: str) -> ModelConfig:
    """The preset called ``name``; ValueError names the bad value and lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
