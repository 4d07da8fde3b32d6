"""The deployment files (Dockerfile, deploy/kubernetes/) stay true to the CLI and the routes:
every command line they hold parses, every probe answers on a real server, ports agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import yaml

from pyllama4.server.flags import parse_args

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# What LeaderWorkerSet puts in each pod's environment (Kubernetes expands $(NAME) in args).
POD_ENV = {"LWS_WORKER_INDEX": "1", "LWS_LEADER_ADDRESS": "10.0.0.2"}


def dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def entrypoint() -> list[str]:
    (line,) = [line for line in dockerfile() if line.startswith("ENTRYPOINT ")]
    return json.loads(line.removeprefix("ENTRYPOINT "))


def containers() -> list[dict]:
    """Every container spec in the manifests, with the pod template it came from."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                found.extend(node["containers"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text()):
            walk(document)
    return found


def command_line(container: dict) -> list[str]:
    """The image's entrypoint flags and the container's args, $(NAME)s expanded."""
    assert "command" not in container  # the image's entrypoint runs
    args = [re.sub(r"\$\((\w+)\)", lambda m: POD_ENV[m[1]], a) for a in container["args"]]
    return entrypoint()[1:] + args


def test_the_image_builds_pyllama4_for_gfx942_on_rocm_pytorch():
    lines = dockerfile()
    (base,) = [line for line in lines if line.startswith("ARG BASE_IMAGE=")]
    assert base.removeprefix("ARG BASE_IMAGE=").startswith("rocm/pytorch:")
    assert "FROM ${BASE_IMAGE}" in lines
    (build,) = [line for line in lines if line.startswith("RUN pip install")]
    assert "cmake.define.PYLLAMA4_GPU=hip" in build
    assert "cmake.define.PYLLAMA4_HIP_ARCHS=gfx942" in build
    assert "torch" not in build.split("&&")[0]  # the image's ROCm torch stays
    assert '".[router]"' in build
    assert re.search(r"^router = \[", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), line
    assert entrypoint()[0] == "pyllama4-serve"
    args = parse_args(entrypoint()[1:] + ["--model-path", "org/model"])
    (expose,) = [line for line in lines if line.startswith("EXPOSE ")]
    assert (args.host, args.port) == ("0.0.0.0", int(expose.split()[1]))


def test_every_container_command_line_parses_and_its_ports_agree():
    assert len(MANIFESTS) == 2 and containers()
    for container in containers():
        args = parse_args(command_line(container))
        assert args.model_path.startswith("meta-llama/Llama-4-")
        if args.nnodes > 1:
            assert args.dist_init_addr == "10.0.0.2:20000" and args.node_rank == 1
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if "http" in ports or any(k.endswith("Probe") for k in container):
            assert ports["http"] == args.port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] == "http"


def probe_paths() -> set[str]:
    return {
        container[probe]["httpGet"]["path"]
        for container in containers()
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        if probe in container
    }


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    live = launch_server(tmp_path_factory.mktemp("deploy") / "server.log", "--api-key", "k")
    yield live.base
    live.stop()


def test_every_probe_path_answers_200_without_the_api_key(server):
    """Kubelet probes send no key: the paths must be routes that need none."""
    assert probe_paths()
    for path in probe_paths():
        assert httpx.get(server + path, timeout=30).status_code == 200, path
