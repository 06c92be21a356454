"""Collect step records over a sweep of prompt lengths and batch sizes: the advisor's profile.

The advisor fits its step-time model (advisor/step_model.py) to step records. This script makes a profile
that covers the model's terms: prefill steps over a range of summed prompt lengths (one and several prompts
per step, equal and mixed lengths), decode steps over a grid of batch sizes and context lengths, and mixed
steps (chunked prefill next to running decodes). Records are the shim's own (`--shim-jsonl`, GPU intervals
from CUDA events on a GPU), preceded by a meta record naming the GPU, so the file is a trace in DESIGN.md's
format.

Every prefill shape runs ``PREFILL_REPEATS`` times, in rounds spread over the run (each round in its own
seeded order, a quarter of the decode grid between rounds): a shape's first run (kernel selection, allocator
growth) is then one sample of four that the fit's outlier rule can set aside, and slow drifts (clocks,
temperature) do not line up with the shape. The full sweep steps for about a minute on an H100 with the 8B
preset; ``--quick`` is a small sweep for a CPU smoke test.

    eval "$(bash bench/devpath.sh)"; python3 bench/profile_steps.py --preset llama-3.1-8b --device cuda:0 \
        --out steps.jsonl

Another script with an engine already built (with ``shim_jsonl_path`` set) calls :func:`profile` directly.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import click

#: Runs of each prefill shape, one per round.
PREFILL_REPEATS = 4
#: Token budget per step of the full sweep (the longest prompt runs whole) and of ``--quick``.
FULL_CHUNK = 8192
QUICK_CHUNK = 512


def _run(engine: Any, requests: list[tuple[int, int]], tag: str, rng: random.Random) -> int:
    """Add (prompt_len, max_tokens) requests at once and step until all finish; returns steps run."""
    from phaselens.engine.sampling_params import SamplingParams

    for i, (prompt_len, max_tokens) in enumerate(requests):
        ids = [rng.randrange(0, 256) for _ in range(prompt_len)]
        engine.add_request(f"{tag}-{i}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


def prefill_shapes(quick: bool) -> list[tuple[int, ...]]:
    """Prompt lengths of one prefill step each: 1, 2 or 4 equal prompts, then a few of mixed lengths (the
    multi-sequence attention term ``sum(l^2)`` differs from the equal-length one)."""
    chunk = QUICK_CHUNK if quick else FULL_CHUNK
    lengths = [16, 32, 64, 128] if quick else [64, 128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192]
    shapes = [(n,) * k for n in lengths for k in (1, 2, 4) if n * k <= chunk]
    if quick:
        mixed = [(16, 128), (24, 64, 256), (8, 40, 100, 300)]
    else:
        mixed = [(64, 2048), (128, 512, 3072), (256, 1024, 4096), (1024, 6144), (96, 200, 700, 1800),
                 (48, 5000)]
    return shapes + [m for m in mixed if sum(m) <= chunk]


def decode_grid(quick: bool) -> list[tuple[int, int, int]]:
    """``(context, batch, decode steps)`` runs of the decode grid."""
    batches = [1, 4] if quick else [1, 2, 4, 8, 16, 32, 64, 96]
    contexts = [32, 128] if quick else [256, 1024, 2048, 4096]
    steps = 4 if quick else 24
    return [(c, b, steps) for c in contexts for b in batches]


def profile(engine: Any, quick: bool) -> tuple[int, int]:
    """Run the sweep on ``engine`` (an :class:`LLMEngine`, its shim writing the records, prefix caching off,
    ``max_num_batched_tokens`` at least the sweep's chunk: 8192, or 512 with ``quick``); returns the steps
    run and the wall-clock ns at which its warm-up ended (steps ending before it are not the profile's).
    The scheduler's token budget is changed for the mixed steps and restored at the end."""
    chunk = QUICK_CHUNK if quick else FULL_CHUNK
    budget = engine.scheduler.max_num_batched_tokens
    if budget < chunk:
        raise ValueError(f"the engine's max_num_batched_tokens is {budget}; the sweep needs {chunk}")
    rng = random.Random(0)
    shapes = prefill_shapes(quick)
    grid = decode_grid(quick)
    # warm-up, dropped from the profile by main(): every prefill shape once. On the H100 the first run of a
    # small prefill shape took ~24 ms against ~12 ms after (lazily loaded GEMM kernels, allocator growth):
    # 22 of 157 prefill steps, the first round's, were outliers of the fit (bench/RESULTS.md, 05:48)
    steps = _run(engine, [(64, 2)], "warm", rng)
    for i, shape in enumerate(shapes):
        steps += _run(engine, [(n, 1) for n in shape], f"w{i}", rng)
    warm_end_ns = time.time_ns()  # step() read its sampled ids back: the warm-up's GPU work is done
    for rnd in range(PREFILL_REPEATS):
        order = list(shapes)
        random.Random(1000 + rnd).shuffle(order)
        for i, shape in enumerate(order):
            steps += _run(engine, [(n, 1) for n in shape], f"p{rnd}.{i}", rng)
        for j, (context, batch, n_dec) in enumerate(grid[rnd::PREFILL_REPEATS]):  # a quarter of the grid
            steps += _run(engine, [(context, n_dec)] * batch, f"d{rnd}.{j}", rng)
    # mixed: a long prompt arriving while a batch decodes, with a small chunk budget for the prompt
    longest = max(max(s) for s in shapes)
    contexts = sorted({c for c, _, _ in grid})
    n_dec = grid[0][2]
    engine.scheduler.max_num_batched_tokens = 256 if quick else 1024
    try:
        for batch in sorted({b for _, b, _ in grid})[:4]:
            steps += _run(engine, [(contexts[0], n_dec * 2)] * batch + [(longest, 2)], f"m{batch}", rng)
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    return steps, warm_end_ns


def drop_warm_up(path: str, warm_end_ns: int) -> int:
    """Remove the step records that ended before ``warm_end_ns`` from the trace at ``path``; returns how
    many."""
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            if '"type":"step"' in line and json.loads(line)["t1_ns"] <= warm_end_ns:
                dropped += 1
            else:
                kept.append(line)
    with open(path, "w") as f:
        f.writelines(kept)
    return dropped


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
    chunk = QUICK_CHUNK if quick else FULL_CHUNK
    engine = LLMEngine(EngineConfig(model=preset_name, device=device, max_num_batched_tokens=chunk,
                                    max_num_seqs=128, shim_jsonl_path=out_path, shim_socket_path=None,
                                    enable_prefix_caching=False, num_kv_blocks=2048 if quick else None))
    started = time.monotonic()
    ran, warm_end_ns = profile(engine, quick)
    stepping = time.monotonic() - started
    engine.close()  # the shim's JSONL starts with its own meta record naming the GPU
    warm = drop_warm_up(out_path, warm_end_ns)
    body = open(out_path).read()
    steps = sum(1 for line in body.splitlines() if '"type":"step"' in line)
    prefill = sum(1 for line in body.splitlines() if '"type":"step"' in line and '"phase":"prefill"' in line)
    click.echo(f"{steps} step records ({prefill} prefill) from {preset_name} on {name}: {ran} steps in "
               f"{stepping:.0f} s of stepping, the {warm} warm-up steps left out -> {out_path}")


if __name__ == "__main__":
    main()
