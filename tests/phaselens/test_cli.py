"""The console script answers --version and --help without importing heavy packages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from phaselens import __version__
from phaselens.cli import cli


def test_version_and_help() -> None:
    runner = CliRunner()
    assert __version__ in runner.invoke(cli, ["--version"]).output
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "prefill and decode" in result.output


def test_help_does_not_import_torch() -> None:
    code = "import sys; from phaselens.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported by --help'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_every_float_option_refuses_nan_and_inf() -> None:
    """Every float range option of every command is a FiniteRange: nan passes a plain click.FloatRange (every
    comparison with it is false) and reached int() in the agent, or the advisor's arithmetic, as nonsense."""
    import click

    from phaselens.cli import FiniteRange, cli

    ctx = click.Context(cli)

    def commands(group: click.Group) -> list[click.Command]:
        out = []
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert cmd is not None, name
            out.extend(commands(cmd) if isinstance(cmd, click.Group) else [cmd])
        return out

    ranges = [(c.name, p.name, p.type) for c in commands(cli) for p in c.params
              if isinstance(p.type, click.FloatRange)]
    assert len(ranges) > 20
    assert [r[:2] for r in ranges if not isinstance(r[2], FiniteRange)] == []
    with pytest.raises(click.BadParameter, match="'nan' is not a finite number"):
        FiniteRange(0.0, 1.0).convert("nan", None, None)
