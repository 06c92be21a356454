"""Kubernetes manifests: validated offline (kubernetes-validate for core kinds, the monitoring CRDs against
schemas derived from prometheus-operator's), the kustomize build, and the agent's security posture."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from phaselens.dashboards.generator import load_dashboards

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = [DEPLOY / "base", DEPLOY / "overlays" / "profiling", DEPLOY / "overlays" / "nvidia-runtime"]
K8S_VERSION = "1.30.0"
CRD_SCHEMAS = {kind: json.loads((DEPLOY / "schemas" / f"{kind.lower()}_v1.json").read_text())
               for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")}


#: The kustomization uses `labels:` and inline JSON 6902 `patches:` (kustomize >= 4.1).
MIN_KUSTOMIZE = (4, 1)


@functools.cache
def _kustomize_cmd() -> list[str] | None:
    """A kustomize new enough for our kustomizations: standalone, else the one inside kubectl (Debian's
    kubernetes-client 1.20 embeds kustomize 2.0, too old; neither Debian nor PyPI ships kustomize itself)."""
    for probe, cmd in ((["kustomize", "version"], ["kustomize", "build"]),
                       (["kubectl", "version", "--client"], ["kubectl", "kustomize"])):
        if shutil.which(probe[0]) is None:
            continue
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60).stdout
        found = re.search(r"(?:Kustomize Version: |^)v?(\d+)\.(\d+)", out, flags=re.M)
        if found and (int(found.group(1)), int(found.group(2))) >= MIN_KUSTOMIZE:
            return cmd
    return None


def _build(path: Path) -> list[dict[str, Any]]:
    cmd = _kustomize_cmd()
    assert cmd is not None
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _raw_docs(path: Path) -> list[dict[str, Any]]:
    """The resources a kustomization lists, read directly (no transformers)."""
    kust = yaml.safe_load((path / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        target = (path / res).resolve()
        if target.is_dir():
            docs += _raw_docs(target)
        else:
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d]
    return docs


def _docs(path: Path) -> list[dict[str, Any]]:
    return _build(path) if _kustomize_cmd() else _raw_docs(path)


def _validate(doc: dict[str, Any]) -> None:
    kind = doc["kind"]
    if kind in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[kind])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_resources_resolve() -> None:
    """Runs without a kustomize binary: every listed resource exists and parses."""
    for path in KUSTOMIZATIONS:
        kust = yaml.safe_load((path / "kustomization.yaml").read_text())
        for res in kust["resources"]:
            target = (path / res).resolve()
            assert target.exists(), f"{path}/kustomization.yaml lists missing {res}"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), target
        assert _raw_docs(path)


@pytest.mark.skipif(_kustomize_cmd() is None,
                    reason="no kustomize >= 4.1 (kustomize or kubectl) on PATH; resources still checked by "
                           "test_kustomization_resources_resolve")
@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomize_build(path: Path) -> None:
    docs = _build(path)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ConfigMap") == len(load_dashboards())
    for kind in ("DaemonSet", "Namespace", "PodMonitor", "PrometheusRule", "Service", "ServiceAccount",
                 "ServiceMonitor"):
        assert kind in kinds, kind
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "phaselens-system", d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "phaselens"


@pytest.mark.parametrize("path", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_every_manifest_validates_offline(path: Path) -> None:
    for doc in _docs(path):
        _validate(doc)


def test_example_engine_deployment_validates() -> None:
    for doc in yaml.safe_load_all((DEPLOY / "examples" / "engine-deployment.yaml").read_text()):
        _validate(doc)
        pod = doc["spec"]["template"]["spec"]
        mount = {"name": "phaselens-socket", "mountPath": "/run/phaselens"}
        assert mount in pod["containers"][0]["volumeMounts"]
        assert 65532 in pod["securityContext"]["supplementalGroups"]
        # the PodMonitor selects it
        pm = yaml.safe_load((DEPLOY / "base" / "podmonitor.yaml").read_text())
        for k, v in pm["spec"]["selector"]["matchLabels"].items():
            assert doc["spec"]["template"]["metadata"]["labels"][k] == v


def test_crd_schemas_reject_what_the_operator_rejects() -> None:
    sm = yaml.safe_load((DEPLOY / "base" / "servicemonitor.yaml").read_text())
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"  # misspelt field
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        jsonschema.validate(bad, CRD_SCHEMAS["ServiceMonitor"])
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CRD_SCHEMAS["ServiceMonitor"])
    del bad["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="selector"):
        jsonschema.validate(bad, CRD_SCHEMAS["ServiceMonitor"])


def _agent(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]


def test_agent_daemonset_posture() -> None:
    pod = _agent(_docs(DEPLOY / "base"))
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    (agent,) = pod["containers"]
    sc = agent["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["socket-dir"]["hostPath"]["path"] == "/run/phaselens"
    assert "runtimeClassName" not in pod


def test_profiling_overlay_adds_sys_admin_only_to_the_agent() -> None:
    base = _agent(_docs(DEPLOY / "base"))
    prof = _agent(_docs(DEPLOY / "overlays" / "profiling")) if _kustomize_cmd() else None
    if prof is None:
        pytest.skip("the overlay's JSON patch needs a kustomize binary to apply")
    assert prof["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert prof["initContainers"] == base["initContainers"]
    assert "--source=gpm" in prof["containers"][0]["args"]
    assert not [a for a in prof["containers"][0]["args"] if a.startswith(("--dcgm-url", "--source=dcgm"))]
    rt = _agent(_build(DEPLOY / "overlays" / "nvidia-runtime"))
    assert rt["runtimeClassName"] == "nvidia"


def test_prometheusrule_and_configmaps_carry_the_sources() -> None:
    (rule,) = yaml.safe_load_all((DEPLOY / "base" / "prometheusrule.yaml").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus" / "phaselens-rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]
    maps = [d for d in yaml.safe_load_all((DEPLOY / "base" / "grafana-dashboards.yaml").read_text())]
    boards = load_dashboards()
    assert len(maps) == len(boards)
    for cm in maps:
        assert cm["metadata"]["labels"] == {"grafana_dashboard": "1"}
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == boards[name]


def test_dockerfile_runs_the_agent_as_non_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r'^ENTRYPOINT \["phaselens"\]', text, flags=re.M)
    for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (ROOT / src.rstrip("/")).exists(), f"Dockerfile copies missing {src}"
    # the agent image must not pull the engine's torch
    assert "--no-deps" in text and "torch" not in re.sub(r"#.*", "", text)
    # everything the image installs for the agent is declared in setup.cfg
    cfg = (ROOT / "setup.cfg").read_text()
    for req in re.findall(r'"([a-z0-9_.-]+)>=', text):
        assert req in cfg, req


def test_install_test_deps_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(DEPLOY / "install-test-deps.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", [DEPLOY / "base", DEPLOY / "overlays" / "profiling"], ids=lambda p: p.name)
def test_agent_args_are_accepted_by_the_agent_cli(path: Path) -> None:
    commands = pytest.importorskip("phaselens.agent.commands", reason="phaselens agent not present")
    if path.name == "profiling" and not _kustomize_cmd():
        pytest.skip("the overlay's JSON patch needs a kustomize binary to apply")
    (agent,) = _agent(_docs(path))["containers"]
    assert agent["args"][0] == "agent"
    env = {"HOST_IP": "10.0.0.7"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in agent["args"][1:]]
    ctx = commands.agent.make_context("agent", args)  # click parses and validates every flag
    port = next(p["containerPort"] for p in agent["ports"] if p["name"] == "metrics")
    assert ctx.params["port"] == port and ctx.params["listen_address"] == "0.0.0.0"
    assert ctx.params["socket_path"] == "/run/phaselens/phaselens.sock"
