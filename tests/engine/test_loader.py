"""--model PATH: a tiny Hugging Face folder written here loads and gives the same logits."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from phaselens.engine.config import ModelConfig, RopeScaling
from phaselens.engine.llm_engine import EngineConfig, LLMEngine
from phaselens.engine.loader import resolve
from phaselens.engine.model import LlamaModel
from phaselens.engine.sampling_params import SamplingParams

from tests.engine.test_tokenizer import _bpe_tokenizer_json


CFG = ModelConfig(name="hf-tiny", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, rope_theta=10000.0,
                  rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=64), bos_token_id=0,
                  eos_token_ids=(1,))


def _hf_config(cfg: ModelConfig) -> dict:
    rs = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings},
        "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "torch_dtype": "float32",
    }


def write_folder(path: Path, model: LlamaModel, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_hf_config(model.config)))
    tensors = {k: v.detach().clone().contiguous() for k, v in model.hf_state_dict().items()}
    names = sorted(tensors)
    for i in range(shards):
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(path / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    _bpe_tokenizer_json(path)
    return path


@pytest.mark.parametrize("tied", [False, True])
def test_hf_folder_loads_with_the_same_logits(tmp_path: Path, tied: bool) -> None:
    cfg = replace(CFG, tie_word_embeddings=tied)
    ref = LlamaModel.random(cfg, seed=11)
    folder = write_folder(tmp_path / "m", ref, shards=2)
    engine = LLMEngine(EngineConfig(model=str(folder), shim_enabled=False))
    assert engine.model_config.rope_scaling == cfg.rope_scaling
    ids = engine.tokenizer.encode("the quick brown fox")
    assert ids[0] == 0 and max(ids) < 300
    x = torch.tensor(ids)
    torch.testing.assert_close(engine.worker.model.forward_dense(x), ref.forward_dense(x), rtol=0, atol=0)
    # and the engine serves it: greedy output equals the reference's
    engine.add_request("r", ids, SamplingParams(max_tokens=8, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final is not None and final.output_token_ids == ref.greedy_dense(ids, 8)


def test_bad_folders_name_the_file(tmp_path: Path) -> None:
    ref = LlamaModel.random(CFG, seed=1)
    with pytest.raises(ValueError, match="neither a preset"):
        resolve(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve(str(empty))

    folder = write_folder(tmp_path / "m", ref)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        resolve(str(folder))

    folder = write_folder(tmp_path / "m2", ref)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json"):
        resolve(str(folder))

    folder = write_folder(tmp_path / "m3", ref)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
        resolve(str(folder))

    folder = write_folder(tmp_path / "m4", ref)
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=f"{shard.name}: not a readable safetensors"):
        LLMEngine(EngineConfig(model=str(folder), shim_enabled=False))

    folder = write_folder(tmp_path / "m5", ref)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 64  # the weights no longer fit the config
    cfg["head_dim"] = 16
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has shape"):
        LLMEngine(EngineConfig(model=str(folder), shim_enabled=False))
