"""The ``phaselens`` command line.

Each subcommand lives in the package it belongs to (``engine/commands.py``, ``agent/commands.py``, ...)
and is imported only when it is run, so ``phaselens --help`` stays fast and one package's heavy imports
(torch, fastapi) never slow another's command. A command whose module is not installed yet is hidden.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
from typing import Any

import click

from phaselens import __version__


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf, for every command's float options: nan passes every
    range comparison (it reached int() deep in the agent as a traceback), and neither is a duration, a rate
    or a size."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        out = super().convert(value, param, ctx)
        if not math.isfinite(out):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return out


# name -> ("module:attribute" of a click.Command, one-line help). The order is the order of `--help`; the
# one-line help is here so that `--help` imports none of the commands' modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("phaselens.demo:demo", "Start engine, agent and load; show the blended vs per-phase split."),
    "generate": ("phaselens.engine.commands:generate", "Run the bundled engine offline on prompts."),
    "serve": ("phaselens.engine.serve_cli:serve", "Serve a model over an OpenAI-compatible HTTP API."),
    "load": ("phaselens.engine.loadgen_cli:load", "Send a seeded load to a server; report latency, goodput."),
    "mode": ("phaselens.engine.mode_cli:mode", "Show or change the engine's colocated/split mode."),
    "agent": ("phaselens.agent.commands:agent", "Run the node agent: sample, attribute per phase, export."),
    "record": ("phaselens.agent.commands:record", "Record a trace of steps and samples."),
    "attribute": ("phaselens.agent.commands:attribute", "Attribute a recorded trace per phase, offline."),
    "advise": ("phaselens.advisor.commands:advise", "Should prefill and decode run on separate GPU pools?"),
    "dashboards": ("phaselens.dashboards.commands:dashboards", "Generate or preview the Grafana dashboards."),
    "probe": ("phaselens.kernels.commands:probe", "Measure this node's matmul and memory-bandwidth peaks."),
}


def _available(target: str) -> bool:
    """Whether a command's module exists, found without importing its package (which may import torch)."""
    module = target.split(":", 1)[0]
    parent, _, leaf = module.rpartition(".")
    try:
        spec = importlib.util.find_spec(parent)
    except ModuleNotFoundError:
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.exists(os.path.join(loc, leaf + ".py")) or os.path.isdir(os.path.join(loc, leaf))
               for loc in spec.submodule_search_locations)


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (target, _) in COMMANDS.items() if _available(target)]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None or not _available(entry[0]):
            return None
        target = entry[0]
        module_name, attr = target.split(":", 1)
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phaselens")
@click.option("--log-level", default="WARNING", show_default=True, envvar="PHASELENS_LOG_LEVEL",
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Logging level for phaselens' own messages.")
def cli(log_level: str) -> None:
    """phaselens: see prefill and decode separately on your GPUs, and decide whether to split them."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="phaselens")


if __name__ == "__main__":  # pragma: no cover
    main()
