"""Build the model and tokenizer for ``--model``: a preset name (random weights) or a local HF folder.

A Hugging Face folder holds ``config.json`` (Llama architecture), one or more ``*.safetensors`` with
``LlamaForCausalLM`` parameter names, and ``tokenizer.json``. Anything missing or malformed is a
ValueError naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from phaselens.engine.config import PRESETS, ModelConfig, preset
from phaselens.engine.model import LlamaModel
from phaselens.engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """What ``--model`` names: the config and where the weights and tokenizer come from."""

    config: ModelConfig
    folder: Path | None  # None: a random-weight preset

    def tokenizer(self) -> Tokenizer:
        if self.folder is None:
            return ByteTokenizer()
        c = self.config
        return HFTokenizer(self.folder / "tokenizer.json", c.bos_token_id, c.eos_token_ids)

    def build(self, device: torch.device, dtype: torch.dtype, seed: int, max_positions: int) -> LlamaModel:
        if self.folder is None:
            return LlamaModel.random(self.config, device, dtype, seed=seed, max_positions=max_positions)
        model = LlamaModel(self.config, device, dtype, max_positions=max_positions)
        model.load_hf_state_dict(read_safetensors(self.folder), source=str(self.folder))
        return model


def resolve(model: str) -> ModelSource:
    """A preset name or a folder path; ValueError names the bad value or file."""
    if model in PRESETS:
        return ModelSource(preset(model), None)
    path = Path(model)
    if not path.exists():
        raise ValueError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    if not path.is_dir():
        raise ValueError(f"{path}: not a folder (expected config.json, *.safetensors, tokenizer.json)")
    config = ModelConfig.from_hf_config(path / "config.json", name=path.name)
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path / 'tokenizer.json'}: missing (a Hugging Face model folder needs one)")
    if not sorted(path.glob("*.safetensors")):
        raise ValueError(f"{path}: no *.safetensors weight files")
    return ModelSource(config, path)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder's ``*.safetensors`` files, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{f}: not a readable safetensors file ({exc})") from None
        dup = tensors.keys() & part.keys()
        if dup:
            raise ValueError(f"{f}: tensor {sorted(dup)[0]!r} also appears in another file")
        tensors.update(part)
    log.info("read %d tensors from %d safetensors files in %s", len(tensors), len(files), folder)
    return tensors
