"""``phaselens serve``: the OpenAI-compatible API front-end and its engine worker processes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from phaselens.phase import Role

log = logging.getLogger(__name__)


def _shim_jsonl(path: str | None, worker: int, workers: int) -> str | None:
    """Each worker writes its own step file: ``{worker}`` in the path is replaced, else ``.wN`` is added."""
    if path is None:
        return None
    if "{worker}" in path:
        return path.replace("{worker}", f"w{worker}")
    if workers == 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.w{worker}{p.suffix}"))


def build_worker_configs(model: str, workers: int, device: str, engine_args: dict, shim_jsonl: str | None,
                         role: Role = Role.COLOCATED) -> list:
    """One :class:`WorkerConfig` per worker: ``cuda`` puts worker i on ``cuda:i``; CPU workers share cores."""
    from phaselens.engine.worker_process import WorkerConfig

    threads = max(1, (os.cpu_count() or 1) // workers) if device == "cpu" else None
    configs = []
    for i in range(workers):
        dev = f"cuda:{i}" if device == "cuda" else device
        args = dict(engine_args, model=model, device=dev,
                    shim_jsonl_path=_shim_jsonl(shim_jsonl, i, workers))
        if dev == "cpu":
            args["gpu_uuid"] = f"GPU-sim-{i}"  # docs/contracts.md: CPU workers' simulated GPU ids
        configs.append(WorkerConfig(worker_id=f"w{i}", role=role, engine_args=args, torch_threads=threads))
    return configs


def _check_device(device: str, workers: int) -> None:
    if device == "cpu":
        return
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda":
        if n < workers:
            raise click.BadParameter(f"--device cuda with {workers} workers needs {workers} GPUs; "
                                     f"{n} visible", param_hint="--device")
        return
    if not device.startswith("cuda:") or not device[5:].isdigit():
        raise click.BadParameter(f"{device!r}: expected cpu, cuda or cuda:N", param_hint="--device")
    if workers != 1:
        raise click.BadParameter(f"--device {device} names one GPU; use --device cuda for {workers} workers",
                                 param_hint="--device")
    if int(device[5:]) >= n:
        raise click.BadParameter(f"{device!r}: only {n} GPU(s) visible", param_hint="--device")


@click.command()
@click.option("--model", default=None, help="A preset name or a local Hugging Face folder.")
@click.option("--preset", default=None, help="A preset name (tiny, llama-3.2-1b, llama-3.1-8b, ...).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engine worker processes (one per GPU with --device cuda, or N on CPU).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda (worker i on cuda:i) or cuda:N.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--served-model-name", default=None, help="The model id clients send (default: --model).")
@click.option("--request-log", type=click.Path(dir_okay=False), default=None,
              help="Append one JSON line per finished request here (the advisor's workload record).")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most requests waiting for their first token; more are answered 503 with Retry-After.")
@click.option("--no-worker-restart", is_flag=True,
              help="Leave a worker that died dead (default: restart it, with a doubling backoff).")
@click.option("--max-request-bytes", type=click.IntRange(min=1024), default=2 << 20, show_default=True,
              help="Largest request body; larger ones are answered 413 before they are parsed.")
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-num-batched-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--num-kv-blocks", type=click.IntRange(min=1), default=None,
              help="KV cache blocks per worker (CPU default: the engine's; GPU: from free memory).")
@click.option("--gpu-memory-utilization", type=click.FloatRange(0.05, 0.99), default=0.9, show_default=True)
@click.option("--max-model-len", type=click.IntRange(min=1), default=None)
@click.option("--no-prefix-caching", is_flag=True, help="Turn the prefix cache off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shim-socket", default=None, help="The phase shim's datagram socket (default: the agent's).")
@click.option("--shim-jsonl", default=None,
              help="Also write each worker's step records here ({worker} in the name, else .wN is added).")
@click.option("--no-shim", is_flag=True, help="Do not emit phase step records.")
@click.option("--worker-start-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True)
@click.option("--mode", "start_mode", type=click.Choice(["colocated", "split"]), default="colocated",
              show_default=True, help="Start colocated, or split into --prefill and --decode pools.")
@click.option("--prefill", type=click.IntRange(min=1), default=None, help="Prefill workers (--mode split).")
@click.option("--decode", type=click.IntRange(min=1), default=None, help="Decode workers (--mode split).")
@click.option("--admin-token-file", type=click.Path(dir_okay=False), default=None,
              help="Turn the admin API (/admin/mode) on with the bearer token in this file "
                   "(or set PHASELENS_ADMIN_TOKEN); without a token the admin API is off.")
@click.option("--admin-remote", is_flag=True,
              help="Accept admin calls from other hosts too (default: this machine only).")
def serve(model: str | None, preset: str | None, workers: int, device: str, host: str, port: int,
          served_model_name: str | None, request_log: str | None, max_queue: int, no_worker_restart: bool,
          max_request_bytes: int, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
          num_kv_blocks: int | None,
          gpu_memory_utilization: float, max_model_len: int | None, no_prefix_caching: bool, seed: int,
          shim_socket: str | None, shim_jsonl: str | None, no_shim: bool,
          worker_start_timeout: float, start_mode: str, prefill: int | None, decode: int | None,
          admin_token_file: str | None, admin_remote: bool) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from phaselens.engine.config import PRESETS

    if model and preset:
        raise click.BadParameter("give --model or --preset, not both", param_hint="--preset")
    if preset is not None and preset not in PRESETS:
        raise click.BadParameter(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}",
                                 param_hint="--preset")
    name = preset or model or "tiny"
    from phaselens.engine.loader import resolve

    try:
        source = resolve(name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    _check_device(device, workers)
    if start_mode == "split":
        if prefill is None or decode is None:
            raise click.BadParameter("--mode split needs --prefill N and --decode N", param_hint="--mode")
        if prefill + decode > workers:
            raise click.BadParameter(f"--prefill {prefill} + --decode {decode} = {prefill + decode} workers, "
                                     f"but --workers is {workers}", param_hint="--prefill/--decode")
    elif prefill is not None or decode is not None:
        raise click.BadParameter("--prefill/--decode apply to --mode split only", param_hint="--mode")
    admin_token = None
    if admin_token_file is not None or os.environ.get("PHASELENS_ADMIN_TOKEN", "").strip():
        from phaselens.engine.mode_cli import read_token

        admin_token = read_token(admin_token_file, "--admin-token-file")
    engine_args = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       block_size=block_size, num_kv_blocks=num_kv_blocks,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       enable_prefix_caching=not no_prefix_caching, seed=seed,
                       shim_socket_path=shim_socket, shim_enabled=not no_shim)
    import uvicorn

    from phaselens.engine.server import APIServer, ServerConfig

    config = ServerConfig(model=name, served_model_name=served_model_name,
                          workers=build_worker_configs(name, workers, device, engine_args, shim_jsonl),
                          max_queue=max_queue, max_request_bytes=max_request_bytes,
                          restart_workers=not no_worker_restart, request_log=request_log,
                          worker_start_timeout_s=worker_start_timeout, admin_token=admin_token,
                          admin_remote=admin_remote)
    server = APIServer(config, tokenizer=source.tokenizer())
    try:
        server.start()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    if start_mode == "split":
        try:
            server.change_mode("split", prefill, decode)
        except (RuntimeError, ValueError) as exc:  # a worker failed the split's health check
            server.stop()
            raise click.ClickException(f"cannot start in split mode: {exc}") from None
    click.echo(f"phaselens serve: {server.model_name} on {len(server.workers)} worker(s) ({device}, "
               f"{server.mode}), max context {server.max_model_len}; listening on http://{host}:{port}"
               f"{'; admin API on' if admin_token else ''}", err=True)
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        server.stop()
