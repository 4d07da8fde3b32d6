"""README.md's commands, typed as shown in the repository root against the installed package:
every script in bench/ and every `python -m pyllama4...` tool README names answers --help, the
"Using the core" example runs, the quickstart serves the demo model to its curl and openai
examples, and CI installs and tests with README's own lines. Also what the wheel installs: one
top-level package, and no bench script named like an installed module (a script's folder comes
first on sys.path, so such a script would import itself instead)."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BENCH_SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


def section(title: str) -> str:
    """README's text under the `## title` heading, up to the next heading of that level."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else len(README)]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


# ---- what the wheel installs ----------------------------------------------------------------


def test_the_wheel_installs_one_top_level_package():
    tops = {f.parts[0] for f in importlib.metadata.files("pyllama4") if f.parts[0] != ".."}
    assert tops == {"pyllama4", f"pyllama4-{importlib.metadata.version('pyllama4')}.dist-info"}
    assert importlib.util.find_spec("server") is None
    scripts = importlib.metadata.distribution("pyllama4").entry_points.select(
        group="console_scripts"
    )
    assert {e.name: e.module for e in scripts} == {
        "pyllama4-serve": "pyllama4.server.cli",
        "pyllama4": "pyllama4.server.cli",
    }


def test_only_the_entry_point_imports_the_http_layer():
    """Imports go down: below pyllama4.server, only `python -m pyllama4.launch_server` (the
    command line's other spelling) imports it."""
    package = Path(importlib.util.find_spec("pyllama4").origin).parent
    offenders = []
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[0] == "server" or rel == Path("launch_server.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n.startswith(("pyllama4.server", "server")) for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def test_the_source_folder_alone_says_to_install():
    """In the repository root with no installed pyllama4 in sight (python -S: no site-packages),
    `import pyllama4` finds only the source folder, which has no compiled core."""
    out = run([sys.executable, "-S", "-c", "import pyllama4"])
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "compiled core is not built" in last and "pip install ." in last


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_no_bench_script_is_named_like_an_installed_module(script):
    assert importlib.util.find_spec(Path(script).stem) is None


# ---- every advertised command answers --help ------------------------------------------------

README_TOOLS = sorted(set(re.findall(r"python -m (pyllama4[\w.]*)", README)))
README_SCRIPTS = sorted(set(re.findall(r"python (bench/\w+\.py)", README)))
HELP_COMMANDS = (
    [["python", f"bench/{name}"] for name in BENCH_SCRIPTS]
    + [["python", "-m", tool] for tool in README_TOOLS]
    + [["pyllama4-serve"], ["pyllama4", "serve"]]
)


def test_readme_names_its_tools_and_scripts():
    assert {"pyllama4.launch_server", "pyllama4.train_eagle3"} <= set(README_TOOLS)
    assert {f"bench/{name}" for name in BENCH_SCRIPTS} >= set(README_SCRIPTS) > set()


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=" ".join)
def test_each_command_answers_help_in_the_repository_root(command):
    program = sys.executable if command[0] == "python" else shutil.which(command[0])
    assert program is not None, f"{command[0]} is not on PATH"
    out = run([program, *command[1:], "--help"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:"), out.stdout


# ---- README's examples, as typed ------------------------------------------------------------


def test_using_the_core_example_runs_as_typed():
    (example,) = code_blocks(section("Using the core"), "python")
    out = run([sys.executable, "-"], input=example)
    assert out.returncode == 0, out.stderr
    # One request of 4 prompt tokens and max_new_tokens=32, fed token 0 (never its stop id):
    # it ends by length after 32 tokens.
    assert out.stdout.split() == ["1", "length", "32"]


def test_ci_installs_and_tests_with_readmes_lines():
    ci = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    (commands, _) = code_blocks(section("Run the tests"), "bash")
    for line in commands.strip().splitlines():
        assert line in ci, f"README's `{line}` is not what .ci/run runs"


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_quickstart_serves_the_demo_model_as_typed(demo_dir, tmp_path):
    """`pyllama4-serve` with no flags (the demo model, port 30000), then README's curl and
    streaming openai examples against it; SIGTERM stops it with status 0."""
    quickstart = section("Quickstart: serve the built-in demo model")
    serve, curl = code_blocks(quickstart, "bash")
    (client,) = code_blocks(quickstart, "python")
    argv = serve.split("#")[0].split()
    assert argv == ["pyllama4-serve"]
    if not _port_is_free(30000):
        pytest.skip("port 30000, where README's quickstart serves, is taken on this machine")
    log = tmp_path / "server.log"
    server = subprocess.Popen(
        [shutil.which(argv[0])], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 600  # loading; a wide margin for a loaded machine
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get("http://127.0.0.1:30000/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the quickstart server did not come up:\n{log.read_text()}")

        out = run(["bash", "-c", curl])
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)["choices"][0]["message"]["content"]
        assert "Paris" in answer

        out = run([sys.executable, "-"], input=client)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, log.read_text()
    import torch

    named = "GPU kernels: " if torch.cuda.is_available() else "GPU kernels: not used (no GPU)"
    assert named in log.read_text()


def _readme_serve_commands() -> list[list[str]]:
    """Every `pyllama4-serve ...` line of README's bash blocks, continuations joined."""
    commands = []
    for block in code_blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("pyllama4-serve"):
                commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_readmes_serve_commands_use_real_flags():
    """The commands for hardware or files this machine lacks (MI300, a downloaded checkpoint, a
    trained draft) at least parse: every flag they show exists and takes the value shown."""
    from pyllama4.server import flags

    commands = _readme_serve_commands()
    assert len(commands) >= 4  # the quickstart, MI300, EAGLE3 on MI300 and on the demo model
    for argv in commands:
        flags.parse_args(argv)  # argparse exits (status 2) on an unknown flag or a bad value
