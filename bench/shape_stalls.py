"""Do steps of shapes the engine has not run before stall? Serving-like random traffic after start-up.

A serving engine meets a new step shape (prompt length, number of decodes next to a chunk) nearly every step.
Nothing shape-dependent may cost more than the step itself: no kernel compilation, no per-shape plans. This
script builds the engine (its start-up warm-up included), counts the Triton kernel specializations compiled so
far, then feeds it requests with random prompt lengths arriving a few at a time (so prefill, mixed and decode
steps of ever-new shapes follow each other) and reports:

- Triton specializations compiled after start-up (target 0),
- per phase: steps, median and worst host step time, and the worst step against the median of its phase
  (a first-shape stall showed as 0.6-1.3 s against ~20 ms medians, bench/RESULTS.md 2026-11-23 03:57).

    eval "$(bash bench/devpath.sh)"; python3 bench/shape_stalls.py --preset llama-3.1-8b --device cuda:0
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import click

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _compiled() -> int | None:
    try:
        from phaselens.kernels.paged_attention import compiled_variants
    except ImportError:  # no Triton (CPU)
        return None
    return compiled_variants()


@click.command()
@click.option("--preset", "preset_name", default="llama-3.1-8b", show_default=True)
@click.option("--device", default="cuda:0", show_default=True)
@click.option("--requests", "num_requests", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--prompt-max", type=click.IntRange(min=2), default=2000, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
@click.option("--results", type=click.Path(dir_okay=False), default=str(RESULTS), show_default=True)
@click.option("--no-results", is_flag=True)
def main(preset_name: str, device: str, num_requests: int, prompt_max: int, max_tokens: int, seed: int,
         json_out: str | None, results: str, no_results: bool) -> None:
    import torch

    from phaselens.engine.llm_engine import EngineConfig, LLMEngine
    from phaselens.engine.sampling_params import SamplingParams

    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    t_build = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=preset_name, device=device, shim_enabled=False,
                                    enable_prefix_caching=False))
    build_s = time.perf_counter() - t_build
    compiled_at_start = _compiled()
    rng = random.Random(seed)
    pending = [(f"r{i}", [rng.randrange(1, 256) for _ in range(rng.randint(2, prompt_max))])
               for i in range(num_requests)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    steps: list[tuple[str, float]] = []  # phase, host seconds
    while pending or engine.has_unfinished_requests():
        for _ in range(min(len(pending), rng.choice((0, 0, 0, 1, 1, 2, 3)))):
            rid, ids = pending.pop()
            engine.add_request(rid, ids, params)
        if not engine.has_unfinished_requests():
            continue
        before = dict(engine.steps_by_phase)
        t0 = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t0
        ran = [p for p, n in engine.steps_by_phase.items() if n != before.get(p, 0)]
        steps.append((ran[0].value if ran else "none", dt))
    compiled_after = _compiled()
    engine.close()
    by_phase: dict[str, list[float]] = {}
    for phase, dt in steps:
        by_phase.setdefault(phase, []).append(dt)
    rows = []
    for phase, times in sorted(by_phase.items()):
        med = statistics.median(times)
        rows.append({"phase": phase, "steps": len(times), "median_ms": med * 1e3, "max_ms": max(times) * 1e3,
                     "max_over_median": max(times) / med, "over_3x_median": sum(t > 3 * med for t in times)})
    new_compiles = (None if compiled_at_start is None or compiled_after is None
                    else compiled_after - compiled_at_start)
    report = {"preset": preset_name, "device": gpu, "requests": num_requests, "prompt_max": prompt_max,
              "engine_start_s": build_s, "triton_specializations_at_start": compiled_at_start,
              "triton_specializations_compiled_after_start": new_compiles, "phases": rows}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## shape stalls: {preset_name} on {gpu} ({stamp})", "",
             f"- machine: {platform.node()}; command: `python3 bench/shape_stalls.py --preset {preset_name} "
             f"--device {device} --requests {num_requests} --prompt-max {prompt_max} "
             f"--max-tokens {max_tokens}`",
             f"- engine start (warm-up and graph capture included): {build_s:.1f} s; Triton specializations "
             f"at start {compiled_at_start}, **compiled after start: {new_compiles}**", "",
             "| phase | steps | median ms | max ms | max / median | steps over 3x median |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['steps']} | {r['median_ms']:.2f} | {r['max_ms']:.2f} | "
                     f"{r['max_over_median']:.2f} | {r['over_3x_median']} |")
    text = "\n".join(lines) + "\n"
    click.echo(text)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=2))
    if not no_results:
        with open(results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
