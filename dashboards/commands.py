"""``phaselens dashboards generate|preview``."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def dashboards() -> None:
    """Grafana dashboards: generate their JSON, or preview the main panel as a PNG."""


@dashboards.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the JSON here instead of next to the sources.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if a committed JSON file is stale.")
def generate(out_dir: Path | None, check: bool) -> None:
    """Render every dashboards/*.dashboard.py (grafanalib) to JSON."""
    from phaselens.dashboards.generator import DashboardGenerator

    gen = DashboardGenerator()
    if check:
        stale = gen.stale()
        if stale:
            raise click.ClickException(f"stale dashboard JSON: {', '.join(stale)}; "
                                       "run `phaselens dashboards generate`")
        click.echo(f"{len(gen.sources())} dashboards up to date")
        return
    for path in gen.generate(out_dir):
        click.echo(str(path))


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise click.BadParameter(f"{value!r} is not a positive duration like 90s, 15m, 24h")
    return seconds


@dashboards.command()
@click.option("--prometheus", "prometheus_url", default="http://127.0.0.1:9090", show_default=True,
              help="Base URL of the Prometheus holding phaselens metrics.")
@click.option("--range", "range_s", default="1h", show_default=True, callback=_duration,
              help="Window to draw, ending now (e.g. 15m, 24h).")
@click.option("--hostname", default=".*", show_default=True, help="Regex for the $hostname variable.")
@click.option("--gpu", default=".*", show_default=True, help="Regex for the $gpu variable.")
@click.option("--model-name", default=".*", show_default=True, help="Regex for the $model_name variable.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("phase_split.png"), show_default=True, help="PNG file to write.")
def preview(prometheus_url: str, range_s: float, hostname: str, gpu: str, model_name: str, out: Path) -> None:
    """Draw the "Phase split" dashboard's main panel as a PNG with matplotlib."""
    from phaselens.dashboards.preview import PhaseSplitPreview, PrometheusQueryError

    if not prometheus_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{prometheus_url!r} is not an http(s) URL", param_hint="--prometheus")
    renderer = PhaseSplitPreview(prometheus_url, {"hostname": hostname, "gpu": gpu, "model_name": model_name})
    try:
        n = renderer.render(out, range_s=range_s)
    except (PrometheusQueryError, LookupError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out} ({n} series)")
