"""The "HTTP" group of pyllama4-serve's flags: where the server listens, the API key, what a
client may hold, shutdown and logs."""

from __future__ import annotations

import argparse

from pyllama4.server.flag_types import int_in, positive_seconds, seconds
from pyllama4.server.http_limits import BACKLOG, BODY_TIMEOUT_S, KEEP_ALIVE_S, MAX_BODY_BYTES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000  # SGLang's default
# In-flight requests get this long to finish after SIGTERM / SIGINT; then they are cut. With the
# few seconds the exit takes, a drain fits Kubernetes' default 30 s grace period.
SHUTDOWN_TIMEOUT_S = 20.0
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def add_http_flags(p: argparse.ArgumentParser) -> None:
    """The "HTTP" group: where the server listens, the API key and what a client may hold."""
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default=DEFAULT_HOST, help=f"default {DEFAULT_HOST}")
    http.add_argument(
        "--port",
        type=int_in(0, 65535),
        default=DEFAULT_PORT,
        help=f"default {DEFAULT_PORT}; 0 picks a free port (logged)",
    )
    http.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name in the API (default: --model-path as given)",
    )
    http.add_argument(
        "--api-key",
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every path except GET /health (unknown "
        "paths included: 401 before 404)",
    )
    http.add_argument(
        "--public-metrics",
        action="store_true",
        help="with --api-key: /metrics answers without the key (for a Prometheus scraper)",
    )
    http.add_argument(
        "--timeout-keep-alive",
        type=positive_seconds,
        default=KEEP_ALIVE_S,
        metavar="S",
        help="close a connection idle, or still sending its request's headers, for S seconds "
        f"(default {KEEP_ALIVE_S:g})",
    )
    http.add_argument(
        "--timeout-request-body",
        type=positive_seconds,
        default=BODY_TIMEOUT_S,
        metavar="S",
        help="a request's whole body must arrive within S seconds of its headers, else 408 and "
        f"the connection is closed (default {BODY_TIMEOUT_S:g})",
    )
    http.add_argument(
        "--max-request-body-bytes",
        type=int_in(1),
        default=MAX_BODY_BYTES,
        metavar="N",
        help="larger bodies get 413, from their Content-Length before any byte is read "
        f"(default {MAX_BODY_BYTES})",
    )
    http.add_argument(
        "--limit-concurrency",
        type=int_in(1),
        metavar="N",
        help="answer 503 + Retry-After beyond N requests in the app at once, GET /health aside "
        "(default: what the open files limit allows, 1024 descriptors spared; logged)",
    )
    http.add_argument(
        "--backlog",
        type=int_in(1),
        default=BACKLOG,
        metavar="N",
        help=f"the listening socket's queue of connections not yet accepted (default {BACKLOG})",
    )
    http.add_argument(
        "--graceful-shutdown-timeout",
        type=seconds,
        default=SHUTDOWN_TIMEOUT_S,
        metavar="S",
        help="after SIGTERM, in-flight requests get S seconds to finish; the rest end with a "
        f"503 (or an error event when streaming); default {SHUTDOWN_TIMEOUT_S:g}",
    )
    http.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info")
    http.add_argument(
        "--log-requests",
        action="store_true",
        help="log a line when each request is received and when it ends (and its errors)",
    )
    http.add_argument(
        "--log-requests-level",
        type=int,
        choices=(0, 1, 2, 3),
        default=1,
        help="0: metadata; 1: and sampling parameters; 2: and prompt/output text cut to 2048 "
        "characters; 3: and the whole text (default 1)",
    )
    http.add_argument(
        "--decode-log-interval",
        type=int_in(1),
        default=40,
        metavar="N",
        help="log a `Decode batch.` line every N decode steps (default 40)",
    )
