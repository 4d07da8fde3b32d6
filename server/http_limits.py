"""The HTTP server's bounds on what a client may hold: body size and read time, requests in the
app at once, connections the process can open, and hypercorn's own timers.

Invariants:
- The concurrency cap stays below the process's file-descriptor limit (one descriptor per
  request in the app), leaving room for idle connections, refusals and the process's own files:
  a client that opens too many requests gets a 503, the server never runs out of descriptors
  first.
- hypercorn's read_timeout stays unset: it would drop a client that waits quietly for a long
  completion. Slow clients are bounded by the keep-alive timer until their headers are complete
  (hypercorn stops it at h11.Request) and by the body timeout after that (the router).
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("pyllama4.server")

MAX_BODY_BYTES = 64 << 20  # room for a few base64 images
BODY_TIMEOUT_S = 30.0  # the whole body of a request must arrive within it (408 after)
KEEP_ALIVE_S = 5.0  # uvicorn's default: idle connections, and headers still arriving
BACKLOG = 2048  # uvicorn's default listen backlog
FD_HEADROOM = 1024  # descriptors kept out of the concurrency cap
NOFILE_CEILING = 1 << 20  # the soft limit asked for when the hard limit is unlimited
HEADER_BYTES = 16 * 1024  # hypercorn's default cap on a request's head (larger: 431/400)


@dataclass(frozen=True)
class HTTPLimits:
    """What one client may take of the server."""

    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout: float = BODY_TIMEOUT_S
    limit_concurrency: int | None = None  # requests in the app at once (None: no cap)
    keep_alive_timeout: float = KEEP_ALIVE_S
    backlog: int = BACKLOG


def raise_fd_limit() -> int:
    """Raises RLIMIT_NOFILE's soft limit to its hard limit (logged); returns the soft limit in
    force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY:
        return NOFILE_CEILING
    if soft >= target:
        log.info("open files: soft limit %d (the hard limit)", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("open files: cannot raise the soft limit from %d to %d (%s)", soft, target, e)
        return soft
    log.info("open files: soft limit raised from %d to %d", soft, target)
    return target


def concurrency_cap(requested: int | None, nofile: int) -> int:
    """--limit-concurrency, or by default the most requests the descriptor limit `nofile`
    allows with FD_HEADROOM to spare (at least half of it); logged either way."""
    default = max(nofile // 2, nofile - FD_HEADROOM)
    if requested is None:
        log.info("limit concurrency: %d requests at once (open files limit %d)", default, nofile)
        return default
    if requested > default:
        log.warning(
            "--limit-concurrency %d: above %d, the most the open files limit (%d) leaves room "
            "for; the process may run out of file descriptors first",
            requested,
            default,
            nofile,
        )
    log.info("limit concurrency: %d requests at once", requested)
    return requested


def configure_hypercorn(config: Any, limits: HTTPLimits) -> None:
    """Sets hypercorn's timers and caps on its Config (hypercorn.config.Config)."""
    config.keep_alive_timeout = limits.keep_alive_timeout
    config.read_timeout = None
    config.h11_max_incomplete_size = HEADER_BYTES
    config.backlog = limits.backlog
