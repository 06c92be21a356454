"""What the phase shim costs the engine: tokens/s with the shim sending to a listener, sending to nobody, and
disabled (the A/B baseline), alternating in one run (issue 2: "with no agent listening the engine runs at the
same speed").

One engine serves the same workload once per mode per round; the modes rotate their order every round so
that none always runs first, and the first round is a warm-up left out of the figures. Prefix caching is off,
so every run does the same work. The listener is a separate process, as the agent is, and reports the GPU
step times it received per phase. A second, engine-free measurement times the shim's own host calls per step
(``step_begin`` + ``step_end`` + ``poll``) around a trivial kernel.

    python3 bench/shim_overhead.py --preset tiny --device cpu
    python3 bench/shim_overhead.py --preset llama-3.1-8b --device cuda:0     # the GPU machine

Figures are printed and appended to bench/RESULTS.md (``--no-results`` to skip).
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

MODES = ("listener", "nobody", "disabled")
ENGINE_ID = "bench-engine"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


# ------------------------------------------------------------------ the listener (its own process: no GIL)


def _listen(path: str, ready: mp.Event, stop: mp.Event, result: mp.Queue) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    ready.set()
    count = bad = 0
    durations: dict[str, list[float]] = {}
    while not stop.is_set():
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        try:
            rec = json.loads(data)
            if rec["engine_id"] == ENGINE_ID:  # the engine's steps, not the engine-free call timing
                durations.setdefault(rec["phase"], []).append((rec["t1_ns"] - rec["t0_ns"]) / 1e6)
            count += 1
        except (ValueError, KeyError):
            bad += 1
    sock.close()
    result.put({"received": count, "bad": bad, "durations_ms": durations})


# ------------------------------------------------------------------ measurement


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()  # outside the engine's steps: read the clock only once the GPU is done


def _workload(n: int, prompt_len: tuple[int, int], max_tokens: int, vocab: int, seed: int):
    rng = random.Random(seed)
    return [[rng.randrange(min(vocab, 256)) for _ in range(rng.randint(*prompt_len))] for _ in range(n)]


def _make_shim(engine, mode: str, listen_path: str, nobody_path: str):
    from phaselens.serving_shim.shim import PhaseShim

    w, c = engine.worker, engine.config
    return PhaseShim(engine.model_config, gpu_uuid=c.gpu_uuid, engine_id=ENGINE_ID, role=c.role,
                     device=w.device, dtype_bytes=w.dtype_bytes,
                     socket_path=listen_path if mode == "listener" else nobody_path,
                     enabled=mode != "disabled")


def _run_once(engine, prompts, max_tokens: int, tag: str) -> tuple[float, int, int, dict]:
    from phaselens.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    steps_before = dict(engine.steps_by_phase)
    secs_before = dict(engine.step_seconds_by_phase)
    _sync(engine.config.device)
    t0 = time.perf_counter()
    out_tokens = steps = 0
    step_ms: dict[str, list[float]] = {}
    counts = dict(engine.steps_by_phase)
    while engine.has_unfinished_requests():
        ts = time.perf_counter()
        out_tokens += sum(len(o.new_token_ids) for o in engine.step())  # its .tolist() waits for the GPU
        te = time.perf_counter()
        steps += 1
        phase = next((p for p, n in engine.steps_by_phase.items() if n != counts[p]), None)
        counts = dict(engine.steps_by_phase)
        if phase is not None:
            step_ms.setdefault(phase.value, []).append((te - ts) * 1e3)
    _sync(engine.config.device)
    elapsed = time.perf_counter() - t0
    per_phase = {p.value: (engine.steps_by_phase[p] - steps_before[p],
                           engine.step_seconds_by_phase[p] - secs_before[p]) for p in engine.steps_by_phase}
    per_phase["step_ms"] = step_ms
    return elapsed, out_tokens, steps, per_phase


def _shim_calls_us(model_config, device: str, dtype_bytes: int, listen_path: str, nobody_path: str,
                   iters: int, batch: int) -> dict[str, float]:
    """Host microseconds per step of the shim's calls, around one trivial kernel (engine-free)."""
    import torch

    from phaselens.phase import Phase
    from phaselens.serving_shim.shim import PhaseShim

    x = torch.zeros(16, device=device)
    ctx = [1000 + i for i in range(batch)]
    out: dict[str, float] = {}
    for mode in ("none",) + MODES:
        shim = None
        if mode != "none":
            shim = PhaseShim(model_config, engine_id="bench-calls", device=device, dtype_bytes=dtype_bytes,
                             socket_path=listen_path if mode == "listener" else nobody_path,
                             enabled=mode != "disabled")
        best = float("inf")
        for _ in range(3):  # best of three: the 2-core CI machines are shared
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                if shim is not None:
                    shim.step_begin()
                x.add_(1.0)
                if shim is not None:
                    shim.step_end(Phase.DECODE, decode_ctx=ctx)
                    shim.poll()
            _sync(device)
            best = min(best, (time.perf_counter() - t0) / iters * 1e6)
        if shim is not None:
            shim.close()
        out[mode] = best
    base = out.pop("none")
    return {m: v - base for m, v in out.items()}


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{platform.node()}, {torch.cuda.get_device_name(torch.device(device))}"
    return f"{platform.node()}, CPU ({os.cpu_count()} cores)"


@click.command()
@click.option("--preset", default="tiny", show_default=True, help="Model preset (engine/config.py).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1, 100),
              help="Measured rounds (each runs every mode once), after one warm-up round.")
@click.option("--requests", "n_requests", default=16, show_default=True, type=click.IntRange(1, 10000))
@click.option("--prompt-len", default="16,128", show_default=True, help="min,max prompt tokens.")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(1, 100000))
@click.option("--max-num-batched-tokens", default=512, show_default=True, type=click.IntRange(1, 1 << 20))
@click.option("--num-kv-blocks", default=None, type=click.IntRange(1, 1 << 24),
              help="KV blocks (default: the engine's).")
@click.option("--shim-iters", default=2000, show_default=True, type=click.IntRange(1, 10**7),
              help="Steps of the engine-free shim-call measurement.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False),
              help="Also write the figures here.")
@click.option("--results/--no-results", default=True, help="Append to bench/RESULTS.md.")
def main(preset: str, device: str, rounds: int, n_requests: int, prompt_len: str, max_tokens: int,
         max_num_batched_tokens: int, num_kv_blocks: int | None, shim_iters: int, json_out: str | None,
         results: bool) -> None:
    """Tokens/s of the engine with the shim to a listener, to nobody, and disabled."""
    try:
        lo, hi = (int(v) for v in prompt_len.split(","))
        if not 1 <= lo <= hi:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected min,max with 1 <= min <= max, got {prompt_len!r}",
                                 param_hint="--prompt-len") from None
    from phaselens.engine.llm_engine import EngineConfig, LLMEngine

    tmp = tempfile.mkdtemp(prefix="pls-bench-")
    listen_path, nobody_path = os.path.join(tmp, "agent.sock"), os.path.join(tmp, "nobody.sock")
    ctx = mp.get_context("spawn")
    ready, stop, result = ctx.Event(), ctx.Event(), ctx.Queue()
    listener = ctx.Process(target=_listen, args=(listen_path, ready, stop, result), daemon=True)
    listener.start()
    if not ready.wait(30):
        raise click.ClickException("the listener process did not start")

    try:
        engine = LLMEngine(EngineConfig(model=preset, device=device,
                                        max_num_batched_tokens=max_num_batched_tokens,
                                        num_kv_blocks=num_kv_blocks, enable_prefix_caching=False,
                                        shim_enabled=False))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    prompts = _workload(n_requests, (lo, hi), max_tokens, engine.model_config.vocab_size, seed=0)
    runs: dict[str, list[tuple[float, int, int, dict]]] = {m: [] for m in MODES}
    stats: dict[str, dict] = {}
    for r in range(rounds + 1):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            engine.shim = _make_shim(engine, mode, listen_path, nobody_path)
            res = _run_once(engine, prompts, max_tokens, f"r{r}-{mode}")
            engine.shim.close()
            s = engine.shim.stats
            if r > 0:  # round 0 warms up (allocator, kernels, caches)
                runs[mode].append(res)
                agg = stats.setdefault(mode, {"sent": 0, "dropped": 0})
                agg["sent"] += s.sent
                agg["dropped"] += s.dropped
            print(f"round {r} {mode:9s} {res[1] / res[0]:10.1f} out tok/s  {res[2]} steps  "
                  f"sent {s.sent} dropped {s.dropped}", file=sys.stderr)

    shim_us = _shim_calls_us(engine.model_config, device, engine.worker.dtype_bytes, listen_path, nobody_path,
                             shim_iters, batch=64)
    stop.set()
    got = result.get(timeout=30)
    listener.join(timeout=10)

    summary: dict[str, dict] = {}
    for mode in MODES:
        rates = [o / t for t, o, _, _ in runs[mode]]
        steps = sum(s for _, _, s, _ in runs[mode])
        # Paired by round: each round ran every mode back to back, so slow spells of a shared machine
        # cancel in the ratio.
        ratios = [o / t / (od / td) - 1.0
                  for (t, o, _, _), (td, od, _, _) in zip(runs[mode], runs["disabled"])]
        summary[mode] = {"out_tok_s_median": statistics.median(rates), "out_tok_s": rates,
                         "vs_disabled": statistics.median(ratios), "vs_disabled_rounds": ratios,
                         "steps": steps, **stats[mode], "shim_us_per_step": shim_us[mode]}
    # Per-step wall time (engine.step(), its host sync included) by phase: the median over hundreds of steps
    # resolves tens of microseconds where whole-run tokens/s, swayed by a few slow steps, does not.
    step_med: dict[str, dict[str, float]] = {}
    for mode in MODES:
        pooled: dict[str, list[float]] = {}
        for _, _, _, per_phase in runs[mode]:
            for p, v in per_phase["step_ms"].items():
                pooled.setdefault(p, []).extend(v)
        step_med[mode] = {p: statistics.median(v) for p, v in pooled.items()}
        summary[mode]["step_ms_median"] = step_med[mode]
        summary[mode]["step_count"] = {p: len(v) for p, v in pooled.items()}
    phase_ms = {}
    for p, (n, secs) in _phase_totals(runs["disabled"]).items():
        if n:
            phase_ms[p] = secs / n * 1e3
    gpu_ms = {p: statistics.median(v) for p, v in got["durations_ms"].items() if v}

    machine = _machine(device)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python3 bench/shim_overhead.py " + " ".join(sys.argv[1:])
    lines = [f"## shim overhead: {preset} on {device} ({when})", "",
             f"- machine: {machine}", f"- command: `{cmd}`",
             f"- workload: {n_requests} requests, prompts {lo}-{hi} tokens, {max_tokens} output tokens each, "
             f"budget {max_num_batched_tokens} tokens/step, prefix caching off; {rounds} measured rounds "
             f"after 1 warm-up, modes rotated",
             "", "| shim | output tok/s (median) | min-max | vs disabled (median of rounds) | steps | sent | "
             "dropped | shim calls us/step |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        s = summary[mode]
        lo_hi = f"{min(s['out_tok_s']):.1f}-{max(s['out_tok_s']):.1f}"
        lines.append(f"| {mode} | {s['out_tok_s_median']:.1f} | {lo_hi} "
                     f"| {s['vs_disabled'] * 100:+.1f}% | {s['steps']} | {s['sent']} | {s['dropped']} "
                     f"| {s['shim_us_per_step']:.1f} |")
    phases = [p for p in ("prefill", "mixed", "decode") if p in step_med["disabled"]]
    lines += ["", "| shim | " + " | ".join(f"{p} step ms (median, n)" for p in phases)
              + " | " + " | ".join(f"{p} vs disabled" for p in phases) + " |",
              "|---" * (1 + 2 * len(phases)) + "|"]
    for mode in MODES:
        med, base_med = step_med[mode], step_med["disabled"]
        cells = [f"{med[p]:.3f} ({summary[mode]['step_count'][p]})" for p in phases]
        cells += [f"{(med[p] - base_med[p]) * 1e3:+.0f} us ({(med[p] / base_med[p] - 1) * 100:+.2f}%)"
                  for p in phases]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "- host step time per phase (engine's perf_counter, disabled shim): "
              + ", ".join(f"{p} {ms:.2f} ms" for p, ms in phase_ms.items()),
              "- GPU step time per phase as the listener received it (median, clock "
              + ("gpu" if device.startswith("cuda") else "host") + "): "
              + ", ".join(f"{p} {ms:.2f} ms" for p, ms in sorted(gpu_ms.items())),
              f"- listener received {got['received']} records ({got['bad']} unreadable); "
              "shim calls us/step: host time of step_begin+step_end+poll for a 64-sequence decode step, "
              "engine-free, best of 3, minus the bare loop", ""]
    text = "\n".join(lines)
    print(text)
    if results:
        with open(RESULTS, "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")
    if json_out:
        Path(json_out).write_text(json.dumps({"machine": machine, "summary": summary, "phase_ms": phase_ms,
                                              "gpu_ms": gpu_ms, "listener": {"received": got["received"],
                                                                             "bad": got["bad"]}}, indent=1))
    engine.close()


def _phase_totals(runs: list[tuple[float, int, int, dict]]) -> dict[str, tuple[int, float]]:
    tot: dict[str, tuple[int, float]] = {}
    for _, _, _, per_phase in runs:
        for p, val in per_phase.items():
            if p == "step_ms":
                continue
            n, secs = val
            a, b = tot.get(p, (0, 0.0))
            tot[p] = (a + n, b + secs)
    return tot


if __name__ == "__main__":
    main()
