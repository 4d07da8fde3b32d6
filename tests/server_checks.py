"""Checks on a live server shared by the end-to-end tests: its Prometheus metrics, idleness."""

from __future__ import annotations

import time

import httpx


def metric(server: str, name: str) -> float:
    """The value of one metric (the first sample of a labelled one) from GET /metrics."""
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def assert_idle(server: str) -> None:
    """Within 10 s nothing runs and no request holds a KV page."""
    deadline = time.monotonic() + 10
    while metric(server, "pyllama4_num_running_reqs") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(server, "pyllama4_num_running_reqs") == 0
    assert metric(server, "pyllama4_pages_held_by_requests") == 0
