"""The ``phaselens`` command line.

Each subcommand lives in the package it belongs to (``engine/commands.py``, ``agent/commands.py``, ...)
and is imported only when it is run, so ``phaselens --help`` stays fast and one package's heavy imports
(torch, fastapi) never slow another's command. A command whose module is not installed yet is hidden.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import click

from phaselens import __version__

# name -> "module:attribute" of a click.Command. The order is the order of `--help`.
COMMANDS: dict[str, str] = {
    "demo": "phaselens.demo:demo",
    "generate": "phaselens.engine.commands:generate",
    "serve": "phaselens.engine.serve_cli:serve",
    "load": "phaselens.engine.loadgen_cli:load",
    "mode": "phaselens.engine.mode_cli:mode",
    "agent": "phaselens.agent.commands:agent",
    "record": "phaselens.agent.commands:record",
    "attribute": "phaselens.agent.commands:attribute",
    "advise": "phaselens.advisor.commands:advise",
    "dashboards": "phaselens.dashboards.commands:dashboards",
    "probe": "phaselens.kernels.commands:probe",
}


def _available(target: str) -> bool:
    module = target.split(":", 1)[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, target in COMMANDS.items() if _available(target)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _available(target):
            return None
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
