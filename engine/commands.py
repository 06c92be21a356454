"""``phaselens generate``: run the bundled engine offline on a few prompts and show the phase split."""

from __future__ import annotations

import re

import click

from phaselens.engine.config import PRESETS


def _check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r}: expected 'cpu' or 'cuda:N'", ctx=ctx, param=param)
    return "cuda:0" if value == "cuda" else value


def _printable(text: str) -> str:
    """Control characters (random-weight models emit any byte) escaped, so they cannot drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


@click.command()
@click.option("--preset", default=None, metavar="NAME",
              help=f"Random-weight model preset ({', '.join(PRESETS)}); default tiny.")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Local Hugging Face folder (config.json, *.safetensors, tokenizer.json).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeat for a batch.")
@click.option("--max-tokens", default=32, show_default=True, type=int, help="Tokens to generate per prompt.")
@click.option("--device", default="cpu", show_default=True, callback=_check_device, help="cpu or cuda:N.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = off.")
@click.option("--seed", default=None, type=int, help="Sampling seed (per request).")
@click.option("--stop", multiple=True, help="Stop string; repeatable.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after EOS (benchmarks).")
@click.option("--max-num-batched-tokens", default=512, show_default=True, type=int,
              help="Token budget of one step (prefill chunk size).")
@click.option("--num-kv-blocks", default=None, type=int, help="KV cache blocks (default: sized by device).")
@click.option("--shim-socket", default=None, metavar="PATH",
              help="Agent socket for step records (default /run/phaselens/phaselens.sock).")
@click.option("--shim-jsonl", default=None, metavar="FILE", help="Also write step records to this file.")
@click.option("--no-shim", is_flag=True, help="Emit no step records.")
def generate(preset: str | None, model_path: str | None, prompts: tuple[str, ...], max_tokens: int,
             device: str, temperature: float, top_p: float, top_k: int, seed: int | None,
             stop: tuple[str, ...], ignore_eos: bool, max_num_batched_tokens: int, num_kv_blocks: int | None,
             shim_socket: str | None, shim_jsonl: str | None, no_shim: bool) -> None:
    """Generate text for PROMPTs with the bundled engine; print it and per-phase step counts and times."""
    # heavy imports only when the command runs (phaselens --help stays fast)
    from phaselens.engine.llm_engine import EngineConfig, LLMEngine
    from phaselens.engine.loader import resolve
    from phaselens.engine.sampling_params import SamplingParams, SamplingParamsError

    if preset is not None and model_path is not None:
        raise click.UsageError("give --preset or --model, not both")
    if preset is not None and preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}",
                                 param_hint="'--preset'")
    model = model_path if model_path is not None else (preset or "tiny")
    if model_path is not None:
        try:
            resolve(model_path)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="'--model'") from None
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=tuple(stop), ignore_eos=ignore_eos)
    except SamplingParamsError as exc:  # it names its field: "at most 16 stop strings" is --stop's fault
        raise click.BadParameter(str(exc), param_hint=f"'--{exc.param.replace('_', '-')}'") from None
    if any(not p for p in prompts):
        raise click.BadParameter("empty prompt", param_hint="'--prompt'")
    config = EngineConfig(model=model, device=device, max_num_batched_tokens=max_num_batched_tokens,
                          num_kv_blocks=num_kv_blocks, shim_socket_path=shim_socket,
                          shim_jsonl_path=shim_jsonl, shim_enabled=not no_shim)
    try:
        engine = LLMEngine(config)
    except ValueError as exc:
        msg = str(exc)
        names = ("max_num_batched_tokens", "num_kv_blocks", "device")
        hint = next((f"'--{n.replace('_', '-')}'" for n in names if msg.startswith(n)), None)
        if msg.startswith("model "):
            hint = "'--model'" if model_path is not None else "'--preset'"
        raise click.BadParameter(msg, param_hint=hint) from None
    with engine:
        ids = []
        for i, prompt in enumerate(prompts):
            tokens = engine.tokenizer.encode(prompt)
            try:
                engine.add_request(f"cli-{i}", tokens, params)
            except ValueError as exc:
                raise click.BadParameter(f"prompt {i + 1}: {exc}", param_hint="'--prompt'") from None
            ids.append(f"cli-{i}")
        final = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        stats = engine.stats()
    for i, rid in enumerate(ids):
        out = final[rid]
        if len(ids) > 1:
            click.echo(f"--- prompt {i + 1}")
        click.echo(_printable(out.text))
        click.echo(f"[{out.num_prompt_tokens} prompt tokens ({out.num_cached_tokens} cached), "
                   f"{len(out.output_token_ids)} output tokens, finish: {out.finish_reason}]")
    click.echo(f"\nmodel {engine.model_config.name} on {engine.worker.device} ({engine.worker.dtype}), "
               f"{engine.worker.num_kv_blocks} KV blocks, {stats.num_preemptions} preemptions")
    click.echo(f"{'phase':<8} {'steps':>6} {'seconds':>9} {'ms/step':>9}")
    for phase, n in stats.steps_by_phase.items():
        secs = stats.step_seconds_by_phase[phase]
        click.echo(f"{phase.value:<8} {n:>6} {secs:>9.3f} {(1000 * secs / n if n else 0.0):>9.2f}")
