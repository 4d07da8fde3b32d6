"""Requests the server cuts short: at the end of the SIGTERM drain (--graceful-shutdown-timeout)
and when a step fails. Each ends with an error its client can tell from success (a 503, or an
error event on a stream) whose text carries no internal detail."""

from __future__ import annotations

import json
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from pyllama4.server.serving import Serving
from server_checks import metric

LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}


def test_the_drain_cuts_what_is_left_with_503s_and_error_events(launch_server, tmp_path):
    """With --graceful-shutdown-timeout 1, two long requests (one streaming) running at SIGTERM
    are cut after about a second: the plain one gets a 503, the stream an error event before
    [DONE] (no chunk with finish_reason "abort"); the server exits 0."""
    live = launch_server(tmp_path / "server.log", "--graceful-shutdown-timeout", "1")
    base = live.base
    results: dict[str, object] = {}

    def plain() -> None:
        body = {"model": "demo", "prompt": "Once upon a time", **LONG}
        results["plain"] = httpx.post(base + "/v1/completions", json=body, timeout=600)

    def streamed() -> None:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": "Tell a long story."}],
            "stream": True,
            **LONG,
        }
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
            results["stream_status"] = r.status_code
            results["events"] = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300  # a wide margin for a loaded machine
    while metric(base, "pyllama4_num_running_reqs") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(base, "pyllama4_num_running_reqs") == 2
    stopped = time.monotonic()
    live.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    assert live.proc.wait(timeout=120) == 0
    took = time.monotonic() - stopped
    print(f"SIGTERM to exit with two requests cut: {took:.1f} s")

    plain_reply = results["plain"]
    assert isinstance(plain_reply, httpx.Response)
    assert plain_reply.status_code == 503
    error = plain_reply.json()["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]

    events = results["events"]
    assert isinstance(events, list) and results["stream_status"] == 200
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"]
    reasons = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert set(reasons) <= {None}  # the cut stream never reports a finish_reason


def _final(error: str | None, *reasons: str) -> SimpleNamespace:
    return SimpleNamespace(error=error, outputs=[SimpleNamespace(finish_reason=r) for r in reasons])


@pytest.mark.parametrize(
    ("failure", "stopping", "final", "status", "words"),
    [
        (None, False, _final(None, "stop", "length"), None, ""),
        (None, True, _final(None, "abort"), 503, "shutting down"),
        (
            None,
            False,
            _final("RuntimeError: /opt/torch/csrc/distributed/c10d/gloo.cpp:42 closed", "error"),
            500,
            "generation failed (RuntimeError)",
        ),
        (
            "tensor-parallel worker pyllama4-tp1 (pid 7) exited with code -9",
            False,
            _final("RuntimeError: /opt/torch/csrc/gloo.cpp:42 Connection closed by peer", "error"),
            503,
            "the server cannot go on (tensor-parallel worker pyllama4-tp1",
        ),
    ],
    ids=["finished", "shutdown", "step-failed", "worker-died"],
)
def test_cut_short_names_the_cause_without_internal_detail(failure, stopping, final, status, words):
    serving = Serving(SimpleNamespace(failure=failure), "demo", 1024)  # type: ignore[arg-type]
    serving.stopping = stopping
    error = serving.cut_short(final)  # type: ignore[arg-type]
    if status is None:
        assert error is None
        return
    assert error is not None and error.status == status
    assert words in error.message and ".cpp" not in error.message and "/opt" not in error.message
