"""Docs do not rot: every command in the README and docs/ is run here, by CI, or parse-checked.

- ```sh blocks: each command runs from the repository root (the venv's bin first on PATH) and must exit 0.
  `make test` and `make demo` are the exception: `.ci/run` runs both on every CI run.
- ```sh-cluster blocks need a cluster or a GPU: each `phaselens` command must parse (every flag and value
  accepted by the real CLI), every repository path named must exist, and `kubectl apply -k DIR` must render
  with `kubectl kustomize DIR` where kubectl exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from phaselens.cli import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(sh|sh-cluster)\n(.*?)^```", re.S | re.M)
_RUN_BY_CI = {"make test", "make demo"}


def _commands(kind: str) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for lang, body in _BLOCK.findall(doc.read_text()):
            if lang != kind:
                continue
            for line in body.replace("\\\n", " ").splitlines():
                command = line.split("  #", 1)[0].strip()
                if command and not command.startswith("#"):
                    out.append((doc.name, command))
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PHASELENS_CACHE_DIR"] = str(ROOT / ".pytest_cache" / "docs-cache")
    return env


def test_docs_have_commands() -> None:
    assert len(_commands("sh")) >= 8 and _commands("sh-cluster")


def test_ci_runs_the_readme_make_targets() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(target in ci for target in _RUN_BY_CI)


@pytest.mark.parametrize("doc, command", _commands("sh"), ids=lambda v: v if len(v) < 60 else v[:60])
def test_sh_command_runs(doc: str, command: str) -> None:
    if command in _RUN_BY_CI:
        pytest.skip(f"{command!r} is run by .ci/run")
    tool = shlex.split(command)[0]
    if tool in ("kubectl", "promtool") and shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed here (deploy/install-test-deps.sh installs promtool)")
    run = subprocess.run(command, shell=True, cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300)
    output = run.stdout[-2000:] + run.stderr[-2000:]
    assert run.returncode == 0, f"{doc}: `{command}` exited {run.returncode}\n{output}"


@pytest.mark.parametrize("doc, command", _commands("sh-cluster"), ids=lambda v: v if len(v) < 60 else v[:60])
def test_cluster_command_parses(doc: str, command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "phaselens":
        # resilient_parsing off: click validates every option and value, but runs nothing
        with cli.make_context("phaselens", argv[1:2], resilient_parsing=True) as ctx:
            sub = cli.get_command(ctx, argv[1])
            assert sub is not None, f"{doc}: no such command {argv[1]!r}"
            try:
                sub.make_context(argv[1], _without_existing_file_checks(sub, argv[2:]), parent=ctx)
            except click.UsageError as exc:
                pytest.fail(f"{doc}: `{command}` does not parse: {exc.format_message()}")
    elif argv[:3] == ["kubectl", "apply", "-k"]:
        target = ROOT / argv[3]
        assert (target / "kustomization.yaml").exists(), f"{doc}: {argv[3]} is no kustomization"
        if shutil.which("kubectl"):
            subprocess.run(["kubectl", "kustomize", str(target)], check=True, capture_output=True,
                           timeout=120)
    else:
        pytest.fail(f"{doc}: no check known for `{command}`; add one here")


def _without_existing_file_checks(command: click.Command, args: list[str]) -> list[str]:
    """Cluster commands name files that exist only on the node (steps.jsonl): point such values at a file
    that exists, so that click checks everything else."""
    must_exist = {opt for p in command.params if isinstance(p, click.Option)
                  and isinstance(p.type, click.Path) and p.type.exists for opt in p.opts}
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg in must_exist:
            out[i + 1] = __file__
    return out
