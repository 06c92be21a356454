"""Engine step times of one preset on one device: a prefill chunk, and decode at batch 1 and 64.

Each step is what :meth:`LLMEngine.step` runs (pack the inputs, model forward over the paged cache, sample,
read the sampled ids back), timed from the host after a synchronize, plus the GPU time of the forward and
sampling from CUDA events around them. Warm-up steps are not timed; the median of ``--iters`` is reported.
FLOPs and bytes come from the shim's analytic step cost (serving_shim/cost.py); TFLOP/s and GB/s are set
against the GPU's datasheet peaks (phaselens/gpus.py). The KV cache is filled with random values, not
zeros (zeros can make kernels look faster than real data does).

    eval "$(bash bench/devpath.sh)"; python3 bench/engine_steps.py --preset llama-3.1-8b --device cuda:0

Prints a table and appends it to bench/RESULTS.md (``--results FILE`` to write elsewhere).
"""

from __future__ import annotations

import gc
import importlib
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import torch

from phaselens.engine.config import ModelConfig, preset
from phaselens.engine.model import LlamaModel, default_dtype
from phaselens.engine.model_runner import ModelRunner
from phaselens.engine.sampling_params import SamplingParams
from phaselens.engine.scheduler import ScheduledSeq, SchedulerOutput
from phaselens.engine.sequence import Sequence
from phaselens.gpus import find_gpu_spec
from phaselens.serving_shim.cost import step_cost

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Case:
    """A step of ``batch`` sequences, each computing ``tokens`` tokens after ``context`` cached ones."""

    def __init__(self, label: str, batch: int, tokens: int, context: int) -> None:
        self.label, self.batch, self.tokens, self.context = label, batch, tokens, context

    def build(self, next_block: int, bs: int, vocab: int,
              gen: torch.Generator) -> tuple[SchedulerOutput, int]:
        out = SchedulerOutput()
        prefill = self.tokens > 1 or self.context == 0
        for i in range(self.batch):
            total = self.context + self.tokens
            ids = torch.randint(0, vocab, (total,), generator=gen).tolist()
            seq = Sequence(f"{self.label}-{i}", ids, SamplingParams(max_tokens=1), 0)
            nb = -(-total // bs)
            seq.block_table = list(range(next_block, next_block + nb))
            next_block += nb
            seq.num_computed_tokens = self.context
            out.scheduled.append(ScheduledSeq(seq, self.tokens, self.context, prefill))
        return out, next_block


def _time_case(runner: ModelRunner, out: SchedulerOutput, dev: torch.device, warmup: int,
               iters: int) -> tuple[float, float]:
    """Median host step seconds and median device seconds (forward + sampling) of one step."""
    host, device = [], []
    for i in range(warmup + iters):
        _sync(dev)
        t0 = time.perf_counter()
        inputs = runner.prepare(out)
        if dev.type == "cuda":
            ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ev0.record()
        sampled = runner.run(out, inputs)
        if dev.type == "cuda":
            ev1.record()
        sampled.tolist()
        t1 = time.perf_counter()
        if i >= warmup:
            host.append(t1 - t0)
            device.append(ev0.elapsed_time(ev1) / 1e3 if dev.type == "cuda" else t1 - t0)
    return statistics.median(host), statistics.median(device)


def _profile(runner: ModelRunner, out: SchedulerOutput, dev: torch.device, label: str) -> float | None:
    """Print the profiler's top ops of 3 steps; return the summed device-kernel seconds of one step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            runner.run(out, runner.prepare(out)).tolist()
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=key, row_limit=14, max_name_column_width=40)
    click.echo(f"\n### profile: {label} (3 steps)\n{table}")
    if dev.type != "cuda":
        return None
    # kernels only (device-side events), so ops and the kernels they launch are not counted twice
    kernel_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
                    for e in averages if getattr(e, "device_type", None) is not None
                    and "CUDA" in str(e.device_type))
    return kernel_us / 3 / 1e6 if kernel_us else None


def _engine_decode(preset_name: str, device: str, batch_sizes: list[int], context: int, block_size: int,
                   warmup: int, iters: int) -> list[tuple[Case, float, float, float, float]]:
    """Decode steps through the whole ``LLMEngine.step()``: scheduler, block manager, packing, phase shim
    (sending to the default agent socket, nobody listening unless an agent runs), graph replay, sampling,
    reading the ids back, sequence updates and request outputs. Per batch size: ``(case, median host
    seconds of step(), median GPU span of forward + sampling, mean FLOPs, mean bytes)``; the prompts are
    prefilled first, untimed."""
    from phaselens.engine.llm_engine import EngineConfig, LLMEngine
    from phaselens.phase import Phase

    cfg = preset(preset_name)
    steps = warmup + iters
    max_b = max(batch_sizes)
    budget = 2048
    per_seq = context + steps + -(-max_b * context // budget) + 8  # decodes also run while prompts prefill
    engine = LLMEngine(EngineConfig(model=preset_name, device=device, max_num_seqs=max_b,
                                    max_num_batched_tokens=budget, block_size=block_size,
                                    num_kv_blocks=max_b * -(-per_seq // block_size) + 8,
                                    max_model_len=per_seq + block_size))
    dev = engine.worker.device
    runner = engine.worker.runner
    run = runner.run
    spans: list[tuple[Any, Any, list[int]]] = []
    events: list[tuple[Any, Any]] = []  # made ahead: creating events inside the timed step costs host time

    def timed_run(out: SchedulerOutput, inputs: Any) -> torch.Tensor:
        if dev.type != "cuda":
            return run(out, inputs)
        if not events:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        ev0, ev1 = events.pop()
        ev0.record()
        sampled = run(out, inputs)
        ev1.record()
        spans.append((ev0, ev1, out.decode_ctx()))
        return sampled

    runner.run = timed_run
    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in batch_sizes:
        params = SamplingParams(max_tokens=per_seq - context, ignore_eos=True)
        ids = [f"decode-b{b}-{i}" for i in range(b)]
        for rid in ids:
            prompt = torch.randint(0, cfg.vocab_size, (context,), generator=gen).tolist()
            engine.add_request(rid, prompt, params)
        while engine.scheduler.waiting or any(q.is_prefilling for q in engine.scheduler.running):
            engine.step()
        host, dev_s, flops, nbytes = [], [], [], []
        if dev.type == "cuda":
            events[:] = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                         for _ in range(steps)]
        for i in range(steps):
            spans.clear()
            decodes = engine.steps_by_phase[Phase.DECODE]
            _sync(dev)
            t0 = time.perf_counter()
            outputs = engine.step()  # its .tolist() waits for the GPU
            t1 = time.perf_counter()
            if len(outputs) != b or engine.steps_by_phase[Phase.DECODE] != decodes + 1:
                raise RuntimeError(f"engine decode step at batch {b}: {len(outputs)} outputs")
            if i < warmup:
                continue
            host.append(t1 - t0)
            ctx = [len(engine._seqs[r]) - 2 for r in ids]  # context before the step just run
            if spans:
                ev0, ev1, ctx = spans[0]
                dev_s.append(ev0.elapsed_time(ev1) / 1e3)
            f, n = step_cost(cfg, [], ctx, engine.worker.dtype_bytes)
            flops.append(f)
            nbytes.append(n)
        for rid in ids:
            engine.abort_request(rid)
        host_s = statistics.median(host)
        rows.append((Case(f"decode b={b} ctx={context}", b, 1, context), host_s,
                     statistics.median(dev_s) if dev_s else host_s, statistics.fmean(flops),
                     statistics.fmean(nbytes)))
        click.echo(f"{'engine':15s} {rows[-1][0].label:28s} host {host_s * 1e3:7.2f} ms  "
                   f"GPU span {rows[-1][2] * 1e3:7.2f} ms", err=True)
    engine.close()
    return rows


#: each variant: (CUDA attention backend, decode CUDA graphs, prefill chunks to SDPA from this length)
VARIANTS = {
    "torch": ("torch", False, None),  # the torch reference, eager (the engine before issue 7)
    "triton": ("triton", False, None),  # Triton attention, eager
    "triton+graphs": ("triton", True, None),  # what the engine runs on CUDA: decode replays a graph
    "sdpa-prefill": ("triton", False, 1),  # first prefill chunks through torch SDPA (flash), not Triton
}


def _runner_rows(cfg: ModelConfig, dev: torch.device, prefill: int, context: int, batch_sizes: list[int],
                 variant_list: list[str], block_size: int, warmup: int, iters: int,
                 profile: bool) -> list[tuple[str, Case, float, float, float | None, float, float]]:
    """The runner-level variants: prepare + forward + sampling + reading the ids back, per case."""
    from phaselens.kernels import set_cuda_attention_backend

    cases = [Case(f"prefill {prefill}", 1, prefill, 0),
             Case(f"prefill {prefill} after {prefill}", 1, prefill, prefill)]
    cases += [Case(f"decode b={b} ctx={context}", b, 1, context) for b in batch_sizes]
    blocks = sum(c.batch * -(-(c.context + c.tokens) // block_size) for c in cases)
    max_pos = max(c.context + c.tokens for c in cases) + 1
    model = LlamaModel.random(cfg, dev, seed=0, max_positions=max_pos)
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    kv = torch.empty(cfg.num_layers, 2, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, device=dev,
                     dtype=model.dtype).normal_(0.0, 1.0)
    runner = ModelRunner(model, kv, block_size)
    gen = torch.Generator().manual_seed(0)
    built = []
    next_block = 0
    for case in cases:
        out, next_block = case.build(next_block, block_size, cfg.vocab_size, gen)
        built.append((case, out))
    rows = []
    default_sdpa_min = None
    pa: Any = None  # kernels/paged_attention.py, once a Triton variant ran
    for variant in variant_list:
        backend, graphs, sdpa_min = VARIANTS[variant]
        if dev.type == "cuda":
            set_cuda_attention_backend(backend)
            if graphs and runner.graphs is None:
                runner.capture_decode_graphs(max(batch_sizes), -(-max_pos // block_size))
            runner.use_cuda_graphs = graphs
            if backend == "triton":
                pa = importlib.import_module("phaselens.kernels.paged_attention")

                if default_sdpa_min is None:
                    default_sdpa_min = pa.PREFILL_SDPA_MIN_TOKENS
                pa.PREFILL_SDPA_MIN_TOKENS = sdpa_min if sdpa_min is not None else default_sdpa_min
        for case, out in built:
            if (graphs and case.tokens > 1) or (sdpa_min is not None and case.tokens == 1):
                continue  # graphs change decode steps only; the SDPA-prefill variant changes prefill only
            host_s, dev_s = _time_case(runner, out, dev, warmup, iters)
            flops, nbytes = step_cost(cfg, out.prefill_seqs(), out.decode_ctx(), dtype_bytes)
            kernel_s = _profile(runner, out, dev, f"{case.label} [{variant}]") if profile else None
            rows.append((variant, case, host_s, dev_s, kernel_s, flops, nbytes))
            click.echo(f"{variant:15s} {case.label:28s} host {host_s * 1e3:7.2f} ms  "
                       f"GPU span {dev_s * 1e3:7.2f} ms", err=True)
    if dev.type == "cuda":  # what the engine runs: Triton attention, the default SDPA threshold
        set_cuda_attention_backend("triton")
        if pa is not None and default_sdpa_min is not None:
            pa.PREFILL_SDPA_MIN_TOKENS = default_sdpa_min
    return rows


@click.command()
@click.option("--preset", "preset_name", default="llama-3.1-8b", show_default=True)
@click.option("--device", default="cuda:0", show_default=True)
@click.option("--prefill", default=2048, show_default=True, type=click.IntRange(1),
              help="Prefill chunk tokens.")
@click.option("--context", default=1024, show_default=True, type=click.IntRange(0), help="Decode context.")
@click.option("--batches", default="1,64", show_default=True, help="Decode batch sizes.")
@click.option("--variants", default="triton+graphs", show_default=True,
              help=f"Comma-separated, of: {', '.join(VARIANTS)}, engine (the CPU runs the torch reference "
              "only). engine: decode steps through the whole LLMEngine.step(), as served (scheduler, "
              "packing, phase shim, graph replay, outputs), after the other variants.")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option("--iters", default=10, show_default=True, type=click.IntRange(1))
@click.option("--results", default=str(RESULTS), show_default=True, help="Markdown file to append to.")
@click.option("--no-results", is_flag=True, help="Print only.")
@click.option("--profile", is_flag=True, help="Also print the torch profiler's top ops of each step.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the rows here.")
def main(preset_name: str, device: str, prefill: int, context: int, batches: str, variants: str,
         block_size: int, warmup: int, iters: int, results: str, no_results: bool, profile: bool,
         json_out: str | None) -> None:
    """Time the engine's prefill and decode steps and print ms, TFLOP/s and GB/s against the GPU's peaks."""
    cfg = preset(preset_name)
    dev = torch.device(device)
    try:
        batch_sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        raise click.BadParameter(f"{batches!r}: expected comma-separated integers", param_hint="'--batches'")
    variant_list = [v.strip() for v in variants.split(",") if v.strip()]
    bad = [v for v in variant_list if v not in VARIANTS and v != "engine"]
    if bad or not variant_list:
        raise click.BadParameter(f"{variants!r}: expected some of {', '.join(VARIANTS)}, engine",
                                 param_hint="'--variants'")
    runner_variants = [v for v in variant_list if v != "engine"]
    if dev.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the worker does (engine/worker.py)
    elif runner_variants:
        runner_variants = ["torch"]
    dtype = default_dtype(dev)
    rows = []
    if runner_variants:  # its model and cache are freed before the engine builds its own
        rows += _runner_rows(cfg, dev, prefill, context, batch_sizes, runner_variants, block_size, warmup,
                             iters, profile)
        if dev.type == "cuda":
            gc.collect()  # the runner's model, cache and graphs, before the engine allocates its own
            torch.cuda.empty_cache()
    if "engine" in variant_list:
        for case, host_s, dev_s, flops, nbytes in _engine_decode(preset_name, device, batch_sizes, context,
                                                                 block_size, warmup, iters):
            rows.append(("engine", case, host_s, dev_s, None, flops, nbytes))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    spec = find_gpu_spec(name) if dev.type == "cuda" else None
    peak_f = spec.peak_bf16_flops if spec else None
    peak_b = spec.peak_dram_bytes_per_s if spec else None
    header = ("| variant | step | tokens | step ms (host) | GPU span ms | kernel ms | TFLOP/s | MFU | GB/s "
              "| MBU | MBU (host step) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for variant, case, host_s, dev_s, kernel_s, flops, nbytes in rows:
        tf, gb = flops / dev_s / 1e12, nbytes / dev_s / 1e9
        mfu = f"{flops / dev_s / peak_f:.1%}" if peak_f else "n/a"
        mbu = f"{nbytes / dev_s / peak_b:.1%}" if peak_b else "n/a"
        mbu_host = f"{nbytes / host_s / peak_b:.1%}" if peak_b else "n/a"
        kern = f"{kernel_s * 1e3:.2f}" if kernel_s else "n/a"
        lines.append(f"| {variant} | {case.label} | {case.batch * case.tokens} | {host_s * 1e3:.2f} | "
                     f"{dev_s * 1e3:.2f} | {kern} | {tf:.1f} | {mfu} | {gb:.0f} | {mbu} | {mbu_host} |")
    peaks = (f"peaks {peak_f / 1e12:.0f} TFLOP/s bf16 dense, {peak_b / 1e12:.2f} TB/s "
             "(datasheet, phaselens/gpus.py)" if spec and peak_f and peak_b else "no GPU peak figures")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entry = "\n".join([
        f"\n## {when}: engine step times, {cfg.name} ({dtype}) on {name}",
        f"machine: {platform.node()}, {name}, torch {torch.__version__}; {peaks}. Median of {iters} steps "
        f"after {warmup} warm-up. Variants: torch = torch reference attention, eager; triton = Triton paged "
        "attention (kernels/paged_attention.py), eager; triton+graphs = decode replayed from a CUDA graph "
        "(engine/cuda_graphs.py); sdpa-prefill = prompts' first chunks through torch SDPA (flash backend) "
        "instead of the Triton kernel; engine = decode through the whole LLMEngine.step() as served "
        "(scheduler, packing, phase shim to the default agent socket, graph replay, sampling, outputs), "
        "contexts growing from the one shown by one token a step. GPU span: CUDA events around forward + "
        "sampling (includes launch gaps when the host is the bottleneck); step ms (host): prepare + forward "
        "+ sampling + reading the ids back (engine: the whole step() call); kernel ms: summed kernel time "
        "from the torch profiler (--profile). Bytes and FLOPs: serving_shim/cost.py.",
        f"command: `python3 bench/engine_steps.py --preset {preset_name} --device {device} "
        f"--prefill {prefill} --context {context} --batches {batches} --variants {variants} "
        f"--warmup {warmup} --iters {iters}{' --profile' if profile else ''}`",
        "", header, *lines, ""])
    click.echo(entry)
    if not no_results:
        with open(results, "a") as f:
            f.write(entry)
    if json_out:
        Path(json_out).write_text(json.dumps({
            "machine": platform.node(), "device": name, "torch": torch.__version__,
            "peak_flops": peak_f, "peak_bytes_per_s": peak_b,
            "rows": [{"variant": v, "step": c.label, "batch": c.batch, "tokens": c.batch * c.tokens,
                      "host_s": h, "gpu_span_s": d, "kernel_s": k, "flops": f, "bytes": n,
                      "mbu": n / d / peak_b if peak_b else None,
                      "mbu_host": n / h / peak_b if peak_b else None,
                      "mfu": f / d / peak_f if peak_f else None}
                     for v, c, h, d, k, f, n in rows]}, indent=1))


if __name__ == "__main__":
    main()
