"""Collect step records over a sweep of prompt lengths and batch sizes: the advisor's profile.

The advisor fits its step-time model (advisor/step_model.py) to step records. This script makes a profile
that covers the model's terms: prefill steps over a range of summed prompt lengths (one and several prompts
per step), decode steps over a grid of batch sizes and context lengths, and mixed steps (chunked prefill next
to running decodes). Records are the shim's own (`--shim-jsonl`, GPU intervals from CUDA events on a GPU),
preceded by a meta record naming the GPU, so the file is a trace in DESIGN.md's format.

    eval "$(bash bench/devpath.sh)"; python3 bench/profile_steps.py --preset llama-3.1-8b --device cuda:0 \
        --out steps.jsonl
"""

from __future__ import annotations

import random
import time

import click


def _run(engine, requests: list[tuple[int, int]], seed: int) -> int:  # type: ignore[no-untyped-def]
    """Add (prompt_len, max_tokens) requests at once and step until all finish; returns steps run."""
    from phaselens.engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    for i, (prompt_len, max_tokens) in enumerate(requests):
        ids = [rng.randrange(0, 256) for _ in range(prompt_len)]
        engine.add_request(f"p{seed}-{i}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


@click.command()
@click.option("--preset", "preset_name", default="llama-3.1-8b", show_default=True)
@click.option("--device", default="cuda:0", show_default=True)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False))
@click.option("--quick", is_flag=True, help="A small sweep (CPU smoke test).")
def main(preset_name: str, device: str, out_path: str, quick: bool) -> None:
    import torch

    from phaselens.engine.llm_engine import EngineConfig, LLMEngine
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "cpu"
    chunk = 512 if quick else 8192
    engine = LLMEngine(EngineConfig(model=preset_name, device=device, max_num_batched_tokens=chunk,
                                    max_num_seqs=128, shim_jsonl_path=out_path, shim_socket_path=None,
                                    enable_prefix_caching=False, num_kv_blocks=2048 if quick else None))
    prompt_lens = [16, 64, 128] if quick else [128, 256, 512, 1024, 2048, 3072, 4096, 6144]
    batches = [1, 4] if quick else [1, 2, 4, 8, 16, 32, 64, 96]
    contexts = [32, 128] if quick else [256, 1024, 2048]
    decode_tokens = 4 if quick else 24
    started = time.monotonic()
    seed = 0
    _run(engine, [(64, 2)], seed)  # warm-up (kernels compiled, allocator warm)
    for length in prompt_lens:  # prefill: one prompt per step, then several that share a step
        for per_step in (1, 2, 4):
            if length * per_step <= chunk:
                seed += 1
                _run(engine, [(length, 1)] * per_step, seed)
    for context in contexts:  # decode grid
        for batch in batches:
            seed += 1
            _run(engine, [(context, decode_tokens)] * batch, seed)
    # mixed: long prompts arriving while a batch decodes, with a small chunk budget for the prompts
    engine.scheduler.max_num_batched_tokens = 256 if quick else 1024
    for batch in batches[:4]:
        seed += 1
        _run(engine, [(contexts[0], decode_tokens * 2)] * batch + [(prompt_lens[-1], 2)], seed)
    engine.close()  # the shim's JSONL starts with its own meta record naming the GPU
    body = open(out_path).read()
    steps = sum(1 for line in body.splitlines() if '"type":"step"' in line)
    click.echo(f"{steps} step records from {preset_name} on {name} in {time.monotonic() - started:.0f} s "
               f"-> {out_path}")


if __name__ == "__main__":
    main()
