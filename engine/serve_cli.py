"""``phaselens serve``: the OpenAI-compatible API front-end and its engine worker processes."""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

import click

from phaselens.cli import FiniteRange
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


def _check_request_log(path: str) -> None:
    """BadParameter unless the request log can be opened for appending (its folders made as serving would
    make them): found at start-up, not as a traceback once the model is loaded."""
    from phaselens.engine.request_log import RequestLog

    try:
        RequestLog(path).close()
    except OSError as exc:
        why = exc.strerror or str(exc)
        blocker = next((p for p in Path(path).absolute().parents if p.exists()), None)
        if blocker is not None and not blocker.is_dir():  # mkdir's "File exists" would not say which
            why = f"{str(blocker)!r} is a file, not a folder"
        raise click.BadParameter(f"cannot append to {path!r}: {why}", param_hint="--request-log") from None


def _check_max_model_len(max_model_len: int | None, max_positions: int, model: str,
                         num_kv_blocks: int | None, block_size: int) -> None:
    """BadParameter for a context the model or the given KV cache cannot hold (the workers would only fail
    to start, one by one)."""
    if max_model_len is None:
        return
    if max_model_len > max_positions:
        raise click.BadParameter(f"{max_model_len} is more than {model} allows ({max_positions} tokens)",
                                 param_hint="--max-model-len")
    if num_kv_blocks is not None and max_model_len > num_kv_blocks * block_size:
        raise click.BadParameter(f"{max_model_len} tokens do not fit the KV cache of --num-kv-blocks "
                                 f"{num_kv_blocks} x --block-size {block_size} = "
                                 f"{num_kv_blocks * block_size} tokens", param_hint="--max-model-len")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound now (before the model loads) and handed to uvicorn later; BadParameter
    naming --host or --port when it cannot be bound (a bad host name, a port in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn itself chooses
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # uvicorn sets it too
        sock.bind((host, port))
    except socket.gaierror as exc:
        sock.close()
        raise click.BadParameter(f"{host!r} is not an address of this machine ({exc.strerror})",
                                 param_hint="--host") from None
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise click.BadParameter(f"cannot listen on {host!r}: {exc.strerror}",
                                     param_hint="--host") from None
        raise click.BadParameter(f"cannot listen on port {port} of {host}: {exc.strerror or exc}",
                                 param_hint="--port") from None
    return sock


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
@click.option("--gpu-memory-utilization", type=FiniteRange(0.05, 0.99), default=0.9, show_default=True)
@click.option("--max-model-len", type=click.IntRange(min=1), default=None)
@click.option("--no-prefix-caching", is_flag=True, help="Turn the prefix cache off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--shim-socket", default=None, help="The phase shim's datagram socket (default: the agent's).")
@click.option("--shim-jsonl", default=None,
              help="Also write each worker's step records here ({worker} in the name, else .wN is added).")
@click.option("--no-shim", is_flag=True, help="Do not emit phase step records.")
@click.option("--worker-start-timeout", type=FiniteRange(min=1), default=600.0, show_default=True)
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
    _check_max_model_len(max_model_len, source.config.max_position_embeddings, name, num_kv_blocks,
                         block_size)
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
    if request_log is not None:
        _check_request_log(request_log)
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
    # bound once, here: a bad --host or a busy --port is a usage error before anything loads, and the
    # address stays ours while the workers start (uvicorn serves on this very socket)
    sock = bind_socket(host, port)
    try:
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
        bound_host, bound_port = sock.getsockname()[:2]  # --port 0: the port the system picked
        shown = f"[{bound_host}]" if sock.family == socket.AF_INET6 else bound_host
        click.echo(f"phaselens serve: {server.model_name} on {len(server.workers)} worker(s) ({device}, "
                   f"{server.mode}), max context {server.max_model_len}; listening on http://{shown}:"
                   f"{bound_port}{'; admin API on' if admin_token else ''}", err=True)
        try:
            uv_server = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", access_log=False))
            try:
                uv_server.run(sockets=[sock])
            except KeyboardInterrupt:  # uvicorn re-raises a Ctrl-C it handled: a normal stop (uvicorn.run)
                pass
        finally:
            server.stop()
        if not uv_server.started:
            raise click.ClickException("the HTTP server failed to start (see its log above)")
    finally:
        sock.close()
