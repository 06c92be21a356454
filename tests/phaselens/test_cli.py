"""The console script answers --version and --help without importing heavy packages."""

from __future__ import annotations

import subprocess
import sys

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
