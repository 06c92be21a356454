"""Host time of one engine decode step with the model replaced by a stub: what the engine's own Python costs.

Runs the real :meth:`LLMEngine.step` (scheduler, block manager, input packing, phase shim, reading the
sampled ids, sequence updates, detokenizing, request outputs) at batch 1 and 64 with 1k-token contexts; only
the model forward and the sampler are replaced by a stub that returns ready-made token ids (no torch
compute). The engine is built on the ``tiny`` preset, whose size does not matter here, with prefix caching
on (the serving default) and distinct random prompts (no prefix hits).

Two passes per batch size, the shim modes (``disabled``, ``nobody`` listening, a ``listener`` process)
alternating step by step so that drift of a shared machine hits all of them alike:

* plain: the wall time of ``engine.step()``, nothing wrapped (the figure of record, us/step);
* staged: the same steps with timers around each stage (schedule, prepare, shim step_begin, the stub, shim
  step_end, scheduler.update, outputs); ``other`` is the rest of ``step()`` (reading the ids back, the
  shim's arguments, counters). Timers add a little, so stages sum to slightly more than the plain figure.

On ``--device cuda:N`` the packing includes the pinned host-to-device copy and the shim records CUDA events,
as in the engine on a GPU (the stub returns ids already on the device); on the CPU neither happens.

    python3 bench/host_overhead.py                        # CPU, batches 1 and 64, 1024-token contexts
    python3 bench/host_overhead.py --device cuda:0 --json-out /tmp/host.json
    python3 bench/host_overhead.py --cprofile 64          # also the top functions of a batch-64 step
"""

from __future__ import annotations

import cProfile
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shim_overhead import Listener, make_shim  # noqa: E402  (the same listener process and shims)

MODES = ("disabled", "nobody", "listener")
STAGES = ("schedule", "prepare", "shim_begin", "model_stub", "shim_end", "update", "outputs", "other")


class _Timers:
    """Accumulates seconds per stage for the step in progress."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        now, clock = self.now, time.perf_counter

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                now[stage] += clock() - t0

        return timed


def _stub_model(engine: Any, vocab: int, seed: int) -> None:
    """Replace the runner's forward + sampling with ready-made ids on the engine's device."""
    import torch

    rng = random.Random(seed)
    # printable ASCII under the byte tokenizer: every token decodes to text at once, as most real ones do
    pool = torch.tensor([rng.randrange(32, min(127, vocab)) for _ in range(4096)], dtype=torch.int64,
                        device=engine.worker.device)
    state = {"i": 0}

    def run(out: Any, inputs: Any) -> torch.Tensor:
        n = len(inputs.sample_index)
        i = state["i"] = (state["i"] + 7) % (len(pool) - 512)
        return pool[i:i + n]

    engine.worker.runner.run = run


def _sync(engine: Any) -> None:
    import torch

    if engine.worker.device.type == "cuda":
        torch.cuda.synchronize(engine.worker.device)


def _measure(engine: Any, shims: dict[str, Any], batch: int, context: int, warmup: int, steps: int,
             seed: int, profile_out: str | None) -> dict[str, Any]:
    """Per pass: prefill ``batch`` fresh prompts of ``context`` tokens, then time decode steps."""
    from phaselens.engine.sampling_params import SamplingParams
    from phaselens.phase import Phase

    rng = random.Random(seed)
    n_modes = len(MODES)
    pass_no = iter(range(1000))

    def start_pass(n_steps: int) -> list[str]:
        # enough output tokens for the decodes run while later prompts prefill, and for every measured step
        budget = engine.scheduler.max_num_batched_tokens
        params = SamplingParams(max_tokens=n_steps + -(-batch * context // budget) + 8, ignore_eos=True)
        ids = [f"b{batch}-p{next(pass_no)}-{i}" for i in range(batch)]
        for rid in ids:
            engine.add_request(rid, [rng.randrange(256) for _ in range(context)], params)
        engine.shim = shims["disabled"]
        while engine.scheduler.waiting or any(s.is_prefilling for s in engine.scheduler.running):
            engine.step()
        return ids

    def end_pass(ids: list[str]) -> int:
        ctx_end = min(len(s) for s in engine.scheduler.running)
        for rid in ids:
            engine.abort_request(rid)
        _sync(engine)
        return ctx_end

    def one(mode: str) -> float:
        engine.shim = shims[mode]
        decodes = engine.steps_by_phase[Phase.DECODE]
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        if len(outputs) != batch or engine.steps_by_phase[Phase.DECODE] != decodes + 1:
            raise RuntimeError(f"expected a decode step of {batch} outputs, got {len(outputs)} outputs")
        return dt

    n = n_modes * (warmup + steps)
    ids = start_pass(n)
    plain: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(n):
        mode = MODES[i % n_modes]
        dt = one(mode)
        if i >= n_modes * warmup:
            plain[mode].append(dt)
    ctx_end = end_pass(ids)

    timers = _Timers()
    runner, sched = engine.worker.runner, engine.scheduler
    saved = {"prepare": runner.prepare, "run": runner.run, "schedule": sched.schedule, "update": sched.update,
             "outputs": engine._outputs}
    ids = start_pass(n)
    runner.prepare = timers.wrap("prepare", saved["prepare"])
    runner.run = timers.wrap("model_stub", saved["run"])
    sched.schedule = timers.wrap("schedule", saved["schedule"])
    sched.update = timers.wrap("update", saved["update"])
    engine._outputs = timers.wrap("outputs", saved["outputs"])
    for shim in shims.values():
        shim.step_begin = timers.wrap("shim_begin", shim.step_begin)
        shim.step_end = timers.wrap("shim_end", shim.step_end)
    staged: dict[str, dict[str, list[float]]] = {m: {s: [] for s in STAGES} for m in MODES}
    for i in range(n):
        mode = MODES[i % n_modes]
        timers.now.clear()
        dt = one(mode)
        if i >= n_modes * warmup:
            known = sum(timers.now.values())
            for s in STAGES[:-1]:
                staged[mode][s].append(timers.now.get(s, 0.0))
            staged[mode]["other"].append(dt - known)
    for shim in shims.values():
        del shim.step_begin, shim.step_end
    del runner.prepare, sched.schedule, sched.update, engine._outputs
    runner.run = saved["run"]
    end_pass(ids)

    if profile_out:
        ids = start_pass(n)
        engine.shim = shims["nobody"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            engine.step()
        prof.disable()
        prof.dump_stats(profile_out)
        end_pass(ids)
    return {
        "batch": batch, "context_start": context, "context_end": ctx_end,
        "plain_us": {m: _summary(v) for m, v in plain.items()},
        "stages_us": {m: {s: statistics.median(v) * 1e6 for s, v in st.items()} for m, st in staged.items()},
    }


def _summary(seconds: list[float]) -> dict[str, float]:
    us = sorted(x * 1e6 for x in seconds)
    return {"median": statistics.median(us), "p10": us[len(us) // 10], "p90": us[(len(us) * 9) // 10],
            "mean": statistics.fmean(us), "n": len(us)}


@click.command()
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N (the stub runs on it).")
@click.option("--batches", default="1,64", show_default=True, help="Decode batch sizes.")
@click.option("--context", default=1024, show_default=True, type=click.IntRange(1, 1536),
              help="Prompt tokens of every sequence (the decode context at the start).")
@click.option("--steps", default=200, show_default=True, type=click.IntRange(1, 300),
              help="Measured steps per shim mode and pass.")
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(0, 100))
@click.option("--seed", default=0, show_default=True)
@click.option("--cprofile", "cprofile_batch", default=None, type=int,
              help="Also profile this batch size's steps (shim nobody) and print the top functions.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Write the figures here.")
def main(device: str, batches: str, context: int, steps: int, warmup: int, seed: int,
         cprofile_batch: int | None, json_out: str | None) -> None:
    """Host microseconds per decode step of the engine with a stub model, by stage and shim mode."""
    import torch

    from phaselens.engine.llm_engine import EngineConfig, LLMEngine

    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        raise click.BadParameter(f"{batches!r}: expected comma-separated integers",
                                 param_hint="'--batches'") from None
    if device == "cpu":
        torch.set_num_threads(1)  # as the engine does for small models (engine/worker.py)
    listener = Listener("pls-host-")
    tmp = listener.tmp

    # a pass's every step, plus the decodes run while later prompts prefill: none finishes while measured
    per_seq = context + len(MODES) * (warmup + steps) + -(-max(sizes) * context // 2048) + 8
    if per_seq > 2048:
        raise click.BadParameter(f"context + {len(MODES)} x (warmup + steps) must stay under the tiny "
                                 f"model's 2048 positions; got {per_seq}")
    bs = 16
    engine = LLMEngine(EngineConfig(model="tiny", device=device, max_num_seqs=max(sizes),
                                    max_num_batched_tokens=2048, block_size=bs,
                                    num_kv_blocks=max(sizes) * -(-per_seq // bs) + 8, max_model_len=2048,
                                    shim_enabled=False, seed=seed))
    _stub_model(engine, engine.model_config.vocab_size, seed)
    shims = {mode: make_shim(engine, mode, listener, engine_id="host-bench") for mode in MODES}
    results = []
    for b in sizes:
        prof_path = os.path.join(tmp, f"b{b}.prof") if b == cprofile_batch else None
        r = _measure(engine, shims, b, context, warmup, steps, seed + b, prof_path)
        results.append(r)
        if prof_path:
            click.echo(f"\n### cProfile: batch {b}, shim nobody, {len(MODES) * (warmup + steps)} steps "
                       "(tottime)")
            pstats.Stats(prof_path).sort_stats("tottime").print_stats(25)
    sent = {m: s.stats.sent for m, s in shims.items()}
    dropped = {m: s.stats.dropped for m, s in shims.items()}
    for s in shims.values():
        s.close()
    got = listener.close()
    received, bad = got["received"], got["bad"]
    engine.close()

    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [f"host overhead per decode step: {platform.node()}, {name}, {os.cpu_count()} cores, load "
             f"{load}, python {platform.python_version()}, torch {torch.__version__}",
             f"command: python3 bench/host_overhead.py {' '.join(sys.argv[1:])}", "",
             "| batch | shim | step us median (p10..p90) | " + " | ".join(STAGES) + " |",
             "|---" * (3 + len(STAGES)) + "|"]
    for r in results:
        for mode in MODES:
            p = r["plain_us"][mode]
            st = r["stages_us"][mode]
            lines.append(f"| {r['batch']} | {mode} | {p['median']:.1f} ({p['p10']:.1f}..{p['p90']:.1f}) | "
                         + " | ".join(f"{st[s]:.1f}" for s in STAGES) + " |")
    lines += ["", f"contexts {context} -> up to {max(r['context_end'] for r in results)} tokens; stages: "
              "median us of the staged pass (timers add ~0.3 us per stage); "
              f"listener received {received} records ({bad} unreadable); sent {sent}, dropped {dropped}"]
    click.echo("\n".join(lines))
    if json_out:
        Path(json_out).write_text(json.dumps({"machine": platform.node(), "device": name, "load": load,
                                              "results": results, "received": received, "bad": bad,
                                              "sent": sent, "dropped": dropped}, indent=1))


if __name__ == "__main__":
    main()
