"""``phaselens probe``: measure this node's matmul rate and memory bandwidth, and cache them as peaks."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--device", default="cuda", show_default=True, help="Device to probe: cuda, cuda:N or cpu.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(3, 1000),
              help="Timed repeats per measurement (the median is kept).")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Store the result as this GPU model's peaks (used for MFU/MBU).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def probe(device: str, repeats: int, cache: bool, as_json: bool) -> None:
    """Measure bf16 matmul FLOP/s and device-memory bandwidth (median of repeats, random data)."""
    import torch

    from phaselens.gpus import find_gpu_spec
    from phaselens.kernels.roofline import RooflineCache, probe as run_probe

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise click.BadParameter(f"{device!r} is not a torch device (cuda, cuda:N or cpu)",
                                 param_hint="--device")
    if dev.type not in ("cuda", "cpu"):
        raise click.BadParameter(f"{device!r}: only cuda and cpu can be probed", param_hint="--device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter(f"{device!r}: CUDA is not available here; use --device cpu",
                                 param_hint="--device")
    result = run_probe(dev, repeats=repeats)
    if cache:
        RooflineCache().put(result)
    spec = find_gpu_spec(result.device_name)
    if as_json:
        payload = result.to_dict()
        if spec:
            payload["datasheet_bf16_flops"] = spec.peak_bf16_flops
            payload["datasheet_dram_bytes_per_s"] = spec.peak_dram_bytes_per_s
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(f"device            {result.device_name}")
    line = (f"matmul ({result.matmul_dtype}, n={result.matmul_n})  "
            f"{result.matmul_flops_per_s / 1e12:8.1f} TFLOP/s")
    if spec:
        line += f"   ({result.matmul_flops_per_s / spec.peak_bf16_flops:.0%} of datasheet " \
                f"{spec.peak_bf16_flops / 1e12:.0f})"
    click.echo(line)
    line = f"copy ({result.copy_bytes >> 20} MiB, read+write)  {result.copy_bytes_per_s / 1e9:8.1f} GB/s"
    if spec:
        line += f"   ({result.copy_bytes_per_s / spec.peak_dram_bytes_per_s:.0%} of datasheet " \
                f"{spec.peak_dram_bytes_per_s / 1e9:.0f})"
    click.echo(line)
    if cache:
        click.echo(f"cached in {RooflineCache().path}")
