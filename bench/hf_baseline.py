"""Baseline for the serving benchmark: Hugging Face ``transformers`` ``generate`` with padded static batches.

The model is a ``LlamaForCausalLM`` built from the preset's config and given exactly the engine's random
weights (``LlamaModel.random(cfg, seed=...)``, copied under HF names by ``LlamaModel.hf_state_dict``), in
bf16 on the same GPU. The requests are the serving benchmark's (``phaselens load``'s seeded ShareGPT-like
workload, engine/loadgen.py), taken in order in static batches of ``--batch-size``: each batch's prompts are
left-padded to its longest prompt, and the batch decodes greedily, EOS ignored, until its longest output is
done (``min_new_tokens = max_new_tokens``), as static batching does. Throughput counts only the tokens each
request asked for (the rest of the batch's steps are padding work), over the wall time of all batches,
after one small warm-up batch that is not counted.

Static batches take as long as their longest output, so ``--num-requests`` may run a prefix of the workload
(batches are drawn in order from the same distribution; the rate is per batch and comparable). Prints a
summary and, with ``--json-out``, writes it for bench/serving_throughput.py.

    eval "$(bash bench/devpath.sh)"; python3 bench/hf_baseline.py --preset llama-3.1-8b --num-requests 128
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone

import click
import torch

from phaselens.engine.config import ModelConfig, preset
from phaselens.engine.loadgen import WorkloadSpec, build_workload
from phaselens.engine.model import LlamaModel


def hf_config(cfg: ModelConfig):  # -> transformers.LlamaConfig; imported here: transformers is optional
    """The ``LlamaConfig`` of a preset (Llama-3 RoPE scaling included)."""
    import inspect

    from transformers import LlamaConfig

    rope: dict = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
              eos_token_id=list(cfg.eos_token_ids), pad_token_id=0, attention_bias=False, mlp_bias=False)
    # transformers 5 takes RoPE settings as one `rope_parameters` dict; 4.x as rope_theta + rope_scaling
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        return LlamaConfig(**kw, rope_parameters={**rope, "rope_theta": cfg.rope_theta})
    return LlamaConfig(**kw, rope_theta=cfg.rope_theta,
                       rope_scaling=None if rope["rope_type"] == "default" else rope)


def build_hf_model(cfg: ModelConfig, device: torch.device, seed: int):
    """``LlamaForCausalLM`` with the engine's random weights for ``seed``, bf16, on ``device``."""
    from transformers import LlamaForCausalLM

    ours = LlamaModel.random(cfg, device, dtype=torch.bfloat16, seed=seed, max_positions=16)
    state = ours.hf_state_dict()
    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            hf = LlamaForCausalLM(hf_config(cfg))
        finally:
            torch.set_default_dtype(prev)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weights did not map onto LlamaForCausalLM: missing {missing}, "
                           f"extra {unexpected}")
    del ours, state
    torch.cuda.empty_cache()
    return hf.eval()


def _deadline_criteria(deadline: float):  # -> transformers.StoppingCriteriaList
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            done = time.perf_counter() > deadline
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Deadline()])


def run_batch(hf, prompts: list[list[int]], outputs: list[int], device: torch.device,
              deadline: float | None = None) -> int:
    """Generate one static batch; returns the steps it decoded (its longest output, or fewer when
    ``deadline`` (a ``perf_counter`` time) passed first)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    steps = max(outputs)
    with torch.inference_mode():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False, pad_token_id=0,
                          stopping_criteria=_deadline_criteria(deadline) if deadline is not None else None)
    done = out.shape[1] - width
    if done != steps and (deadline is None or time.perf_counter() <= deadline):
        raise RuntimeError(f"generate returned {done} new tokens, expected {steps}")
    return done


@click.command()
@click.option("--preset", "preset_name", default="llama-3.1-8b", show_default=True)
@click.option("--device", default="cuda:0", show_default=True)
@click.option("--num-requests", type=click.IntRange(min=1), default=128, show_default=True,
              help="How many of the workload's requests to run (in order).")
@click.option("--workload-requests", type=click.IntRange(min=1), default=500, show_default=True,
              help="Size of the workload drawn (the serving benchmark's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Workload seed (the serving bench's).")
@click.option("--weights-seed", type=int, default=0, show_default=True, help="The engine's model seed.")
@click.option("--max-seconds", type=click.FloatRange(min=1), default=None,
              help="Stop generating after this long (a cut batch counts the tokens made so far; that favours "
                   "the baseline: static batching wastes most at the tail).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def main(preset_name: str, device: str, num_requests: int, workload_requests: int, batch_size: int, seed: int,
         weights_seed: int, max_seconds: float | None, json_out: str | None) -> None:
    """Output tokens per second of HF generate with padded static batches on the serving workload."""
    import transformers

    cfg = preset(preset_name)
    dev = torch.device(device)
    if dev.type != "cuda":
        raise click.BadParameter(f"{device!r}: the baseline is a GPU benchmark", param_hint="'--device'")
    reqs = build_workload(WorkloadSpec(num_requests=workload_requests, rate=float("inf"), seed=seed))
    reqs = reqs[:num_requests]
    t0 = time.perf_counter()
    hf = build_hf_model(cfg, dev, weights_seed)
    click.echo(f"HF model built in {time.perf_counter() - t0:.1f} s "
               f"(transformers {transformers.__version__})")
    run_batch(hf, [r.prompt[:32] for r in reqs[:4]], [8] * 4, dev)  # warm-up, not counted
    torch.cuda.synchronize(dev)
    useful = steps_total = done_requests = 0
    cut = False
    t0 = time.perf_counter()
    deadline = t0 + max_seconds if max_seconds is not None else None
    for b in range(0, len(reqs), batch_size):
        batch = reqs[b:b + batch_size]
        tb = time.perf_counter()
        want = max(r.max_tokens for r in batch)
        steps = run_batch(hf, [r.prompt for r in batch], [r.max_tokens for r in batch], dev, deadline)
        torch.cuda.synchronize(dev)
        useful += sum(min(r.max_tokens, steps) for r in batch)
        steps_total += steps * len(batch)
        done_requests += sum(r.max_tokens <= steps for r in batch)
        click.echo(f"batch {b // batch_size}: {len(batch)} requests, prompts padded to "
                   f"{max(len(r.prompt) for r in batch)}, {steps} of {want} steps in "
                   f"{time.perf_counter() - tb:.1f} s", err=True)
        if steps < want:
            cut = True
            break
    wall = time.perf_counter() - t0
    summary = {"preset": cfg.name, "gpu": torch.cuda.get_device_name(dev), "machine": platform.node(),
               "transformers": transformers.__version__, "torch": torch.__version__,
               "requests": len(reqs), "completed_requests": done_requests, "cut_at_deadline": cut,
               "batch_size": batch_size, "useful_output_tokens": useful,
               "generated_tokens_incl_padding": steps_total, "wall_s": wall,
               "output_token_throughput": useful / wall, "request_throughput": done_requests / wall,
               "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    click.echo(json.dumps(summary, indent=1))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
