"""The server's lifecycle: from parsed flags to a served app, and back down.

Start-up order, so that a bad command line fails in well under a second with a single line on
stderr: parse (one-line argparse errors), check_supported (before any logging, torch import or
loading), then the port is bound (a busy port fails before minutes of loading), then the model is
loaded and the app served with hypercorn until SIGTERM or SIGINT; then in-flight requests drain.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pyllama4.server.checks import (
    TOOL_CALL_PARSERS,
    chat_template_text,
    check_supported,
    checkpoint_is_quantized,
    graph_max_bs,
    resolve_device,
    resolve_dtype,
    resolve_fp8_format,
    speculative_config,
)
from pyllama4.server.compat_flags import configure, step_budget
from pyllama4.server.flags import PROG, parse_args
from pyllama4.server.http_limits import (
    HTTPLimits,
    concurrency_cap,
    configure_hypercorn,
    raise_fd_limit,
)
from pyllama4.server.request_ids import RequestIdFilter

if TYPE_CHECKING:  # torch and the engine load after the flags are checked
    from pyllama4.engine import Engine, EngineConfig
    from pyllama4.multimodal.media import MediaPolicy

log = logging.getLogger("pyllama4.serve")


class _Stopped(Exception):
    """SIGTERM or SIGINT arrived before the server was serving."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def _exit_now(code: int) -> NoReturn:
    """Exit without waiting for the model thread (it may be in the middle of loading)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s:%(request)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())  # " [<request id>]" on a request's lines


def _fail(args: argparse.Namespace, message: str) -> NoReturn:
    raise SystemExit(f"{args.prog}: {message}")


def _bind(args: argparse.Namespace) -> socket.socket:
    """The listening socket, bound now (not listening until hypercorn serves on it), so that a
    busy port or a bad host fails before the model is loaded."""
    try:
        infos = socket.getaddrinfo(
            args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        _fail(args, f"--host {args.host} --port {args.port}: cannot listen there ({e})")
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> None:
    args = parse_args(argv, prog=prog)
    _configure_logging(args.log_level)
    check_supported(args)
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    try:
        if args.dp_size > 1:
            _serve_replicas(args, list(sys.argv[1:] if argv is None else argv))
        _start_and_serve(args)
    except _Stopped as stop:
        name = signal.Signals(stop.signum).name
        log.info("%s before the server was up: stopped", name)
        _exit_now(0 if stop.signum == signal.SIGTERM else 128 + stop.signum)


def _serve_replicas(args: argparse.Namespace, argv: list[str]) -> NoReturn:
    """--dp N: the checkpoint resolved here once (a download or the demo model's conversion
    runs once, shown once), then N replicas of this command line behind sglang-router."""
    from pyllama4.server.data_parallel import serve_replicas

    _resolve_sources(args)
    checkpoint, _ = _checkpoint(args)
    tokenizer = args.tokenizer_path
    if tokenizer is None or not Path(tokenizer).expanduser().is_dir():
        tokenizer = str(checkpoint)
    sys.exit(serve_replicas(args, argv, tokenizer))


def _start_and_serve(args: argparse.Namespace) -> None:
    import anyio

    from pyllama4.server import request_log
    from pyllama4.server.app import AppConfig, create_app  # a broken install fails first
    from pyllama4.server.sampling_defaults import resolve as resolve_defaults

    configure(args)
    _resolve_sources(args)
    if args.node_rank > 0:
        _serve_ranks(args)
        return
    chat_template = None
    if args.chat_template is not None:
        chat_template = chat_template_text(args.chat_template)
    path, served_model_name = _checkpoint(args)
    settings = engine_config(args, path)
    context = settings.context_len
    assert context is not None  # engine_config resolves it
    limits = _http_limits(args)
    sock = _bind(args)
    log.info(
        "loading %s as %r: dtype %s on %s, context %d tokens",
        path,
        served_model_name,
        settings.dtype,
        settings.device,
        context,
    )
    engine = _load(args, settings)
    app_config = AppConfig(
        served_model_name=served_model_name,
        context_length=context,
        api_key=args.api_key,
        public_metrics=args.public_metrics,
        limits=limits,
        max_queued_requests=args.max_queued_requests,
        chat_template=chat_template,
        media=_media_policy(args),
        max_images_per_request=args.max_images_per_request,
        tool_call_parser=TOOL_CALL_PARSERS.get(args.tool_call_parser or ""),
        shutdown_timeout=args.graceful_shutdown_timeout,
        sampling_defaults=resolve_defaults(args.sampling_defaults, path, args.generation_config),
    )
    app = create_app(engine, app_config)
    request_log.configure(args.log_requests, args.log_requests_level)
    engine.batch_log.interval = args.decode_log_interval
    _log_size_check(app.serving.text.chars_per_token, context)  # read once, before serving
    anyio.run(_serve, app, sock, limits, args.graceful_shutdown_timeout, backend="asyncio")
    engine.close()
    log.info("stopped")


def _resolve_sources(args: argparse.Namespace) -> None:
    """Replaces Hub ids in --model-path and --speculative-draft-model-path by the local
    directories they resolve to (downloading what is missing); the model keeps the id as its
    served name. One line and SystemExit if one cannot be resolved."""
    from pyllama4.server.model_source import ModelSourceError, resolve

    if args.model_path is not None and args.served_model_name is None:
        args.served_model_name = args.model_path
    for flag in ("model_path", "speculative_draft_model_path"):
        value = getattr(args, flag)
        if value is None:
            continue
        try:
            revision = args.revision if flag == "model_path" else None
            source = resolve(value, revision=revision, download_dir=args.download_dir)
        except ModelSourceError as e:
            _fail(args, f"--{flag.replace('_', '-')} {value}: {e}")
        if source.repo_id is not None:
            log.info("--%s: %s", flag.replace("_", "-"), source.describe())
        setattr(args, flag, str(source.path))


def _checkpoint(args: argparse.Namespace) -> tuple[Path, str]:
    """The checkpoint directory to serve and the name it is served as."""
    if args.model_path is None:
        from pyllama4.demo import CHECKPOINT_SUBDIR, demo_checkpoint

        log.info("no --model-path: serving the built-in demo model (SmolLM2-135M-Instruct)")
        return demo_checkpoint(), args.served_model_name or CHECKPOINT_SUBDIR
    path = Path(args.model_path).expanduser()
    return path, args.served_model_name or args.model_path


def engine_config(args: argparse.Namespace, path: Path) -> EngineConfig:
    """The engine the flags describe (the same on every node); SystemExit with one line for a
    checkpoint that does not fit them."""
    from pyllama4.config import ConfigError, TextConfig, VisionConfig
    from pyllama4.engine import EngineConfig, SpecConfig

    try:
        text = TextConfig.from_checkpoint(path)
        if args.enable_multimodal and VisionConfig.from_checkpoint(path) is None:
            _fail(
                args,
                f"--enable-multimodal: {path} is a text-only checkpoint (its config.json has no "
                "vision_config); serve a multimodal Llama 4 checkpoint, or drop the flag",
            )
    except ConfigError as e:
        _fail(args, f"--model-path {path}: {e}")
    context = args.context_length or text.max_position_embeddings
    if context > text.max_position_embeddings:
        _fail(
            args,
            f"--context-length {context}: longer than the model's max_position_embeddings "
            f"({text.max_position_embeddings})",
        )
    device = resolve_device(args)
    spec = speculative_config(args)
    given = {
        "mem_fraction_static": args.mem_fraction_static,
        "kv_tokens": args.max_total_tokens,
        "page_size": args.page_size,
        "max_running": args.max_running_requests,
        "max_step_tokens": step_budget(args),
        "policy": args.schedule_policy,
    }
    return EngineConfig(
        path,
        dtype=resolve_dtype(args, device),
        device=device,
        context_len=context,
        enable_multimodal=args.enable_multimodal,
        max_image_tiles=args.max_image_tiles,
        quantization=_quantization(args, path),
        fp8_format=resolve_fp8_format(args, device),
        speculative_draft=(
            None if spec is None else Path(args.speculative_draft_model_path).expanduser()
        ),
        speculative=None if spec is None else SpecConfig(*spec),
        tp=args.tp,
        nnodes=args.nnodes,
        dist_init_method=_init_method(args),
        cuda_graph_max_bs=graph_max_bs(args, device),
        overlap=not args.disable_overlap_schedule,
        cpu_threads=args.cpu_threads,
        cpu_bind=args.cpu_bind,
        cpu_reserved_cores=args.cpu_reserved_cores,
        enable_prefix_cache=not args.disable_radix_cache,
        tokenizer=args.tokenizer_path and os.path.expanduser(args.tokenizer_path),
        **{name: value for name, value in given.items() if value is not None},
    )


def _quantization(args: argparse.Namespace, path: Path) -> str | None:
    """--quantization, unless the checkpoint is quantized already (it loads as such)."""
    if args.quantization is None:
        return None
    if checkpoint_is_quantized(path):
        log.info("--quantization %s: the checkpoint is already quantized", args.quantization)
        return None
    return args.quantization.lower()


def _load(args: argparse.Namespace, config: EngineConfig) -> Engine:
    """Builds the engine (one line and SystemExit if it cannot) and logs its memory plan."""
    import torch

    from pyllama4.engine import Engine

    start = time.monotonic()
    path, device = config.checkpoint, config.device
    try:
        engine = Engine.from_config(config)
    except torch.OutOfMemoryError as e:
        log.debug("loading failed", exc_info=True)
        _fail(args, f"out of memory loading {path} on {device}: {str(e).splitlines()[0]}")
    except (ValueError, OSError) as e:  # ConfigError, a KV budget too small, missing files
        log.debug("loading failed", exc_info=True)
        _fail(args, f"cannot load {path}: {e}")
    layout = config.cpu_layout()  # the plan the model thread applied (this thread is unbound)
    if layout is not None:
        layout.keep_caller_off_compute_cores()
    if engine.workers is not None:
        engine.workers.watch(lambda message: _worker_died(engine, message))
    _log_plan(engine, config, time.monotonic() - start)
    return engine


def _log_plan(engine: Engine, config: EngineConfig, seconds: float) -> None:
    """The memory plan, decode graphs, and what else the engine was built with."""
    weight_bytes, memory, context = engine.weight_bytes, engine.memory, config.context_len
    assert context is not None  # engine_config resolves it
    log.info(
        "loaded in %.1f s; memory plan%s: weights %.2f GiB (%d bytes); %s; max total tokens "
        "%d; max context %d tokens",
        seconds,
        f" per rank (tp {config.tp}, rank 0's shown; every rank alike)" if config.tp > 1 else "",
        weight_bytes / 2**30,
        weight_bytes,
        memory.describe(),
        memory.max_tokens,
        context,
    )
    if engine.memory_report is not None:
        log.info("%s", engine.memory_report.describe())
    if engine.graph_sizes:
        sizes = ", ".join(map(str, engine.graph_sizes))
        log.info("decode graphs captured for batch sizes %s", sizes)
    if memory.max_tokens < context:
        log.warning(
            "the KV cache holds %d tokens, fewer than the context length %d: a single request "
            "cannot grow past %d tokens",
            memory.max_tokens,
            context,
            memory.max_tokens,
        )
    if engine.images is not None:
        log.info("%s", engine.images.describe())
    if engine.speculative is not None:
        log.info("%s", engine.speculative.describe())


def _http_limits(args: argparse.Namespace) -> HTTPLimits:
    """The HTTP limits the flags ask for; the open files limit raised first (it bounds the
    default concurrency cap)."""
    nofile = raise_fd_limit()
    return HTTPLimits(
        max_body_bytes=args.max_request_body_bytes,
        body_timeout=args.timeout_request_body,
        limit_concurrency=concurrency_cap(args.limit_concurrency, nofile),
        keep_alive_timeout=args.timeout_keep_alive,
        backlog=args.backlog,
    )


def _log_size_check(chars_per_token: int | None, context: int) -> None:
    if chars_per_token is None:
        log.info("prompt texts are tokenized whatever their length (no bound for this tokenizer)")
        return
    log.info(
        "prompt texts over %d characters (a token is at most %d) are refused before tokenizing",
        chars_per_token * context,
        chars_per_token,
    )


def _media_policy(args: argparse.Namespace) -> MediaPolicy:
    from pyllama4.multimodal.media import MediaPolicy

    local_media = args.allowed_local_media_path
    domains = args.allowed_media_domains
    return MediaPolicy(
        allow_fetch=not args.disable_image_url_fetch,
        fetch_timeout=args.image_fetch_timeout,
        allowed_domains=None if domains is None else frozenset(domains),
        fetch_networks=args.image_fetch_networks,
        allowed_local_path=Path(local_media).expanduser() if local_media else None,
        max_pixels=args.max_image_pixels,
    )


def _init_method(args: argparse.Namespace) -> str | None:
    return f"tcp://{args.dist_init_addr}" if args.dist_init_addr else None


def _worker_died(engine: Engine, message: str) -> None:
    """A tensor-parallel rank is gone: the others would wait for it forever. /health reports
    it at once; the process exits (status 1) a moment later, whatever it is doing."""
    log.error("%s: the server cannot go on and exits", message)
    engine.fail(message)
    threading.Timer(1.0, _exit_now, args=(1,)).start()


def _serve_ranks(args: argparse.Namespace) -> None:
    """--node-rank > 0: run this node's ranks as workers of node 0's server until it stops
    them; exits non-zero if one fails."""
    from pyllama4.engine import spawn_node_ranks

    config = engine_config(args, Path(args.model_path).expanduser())
    per_node = args.tp // args.nnodes
    first = args.node_rank * per_node
    log.info("node %d: running ranks %d..%d", args.node_rank, first, first + per_node - 1)
    workers = spawn_node_ranks(config, args.node_rank, _init_method(args) or "")
    for p in workers.processes:
        p.join()
    codes = [p.exitcode for p in workers.processes]
    if any(codes):
        _fail(args, f"ranks {first}..{first + per_node - 1} exited with codes {codes}")
    log.info("node %d: its ranks stopped", args.node_rank)


async def _serve(
    app: Any, sock: socket.socket, limits: HTTPLimits, shutdown_timeout: float
) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, give in-flight requests up to
    shutdown_timeout to finish (app.shutdown aborts the rest) and return. A second signal
    during the drain exits at once (status 1)."""
    import anyio
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from pyllama4.server import early_413, request_log

    url = _url(sock)
    config = Config()
    configure_hypercorn(config, limits)
    early_413.install(limits.max_body_bytes)  # 413 from the headers, before `100 Continue`
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn takes the socket over
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = (
        logging.getLogger("hypercorn.access") if log.isEnabledFor(logging.DEBUG) else None
    )
    # hypercorn's own wait for open connections: a backstop behind app.shutdown's timeout.
    config.graceful_timeout = shutdown_timeout + 5.0

    stop = anyio.Event()

    # Only the watcher is ever cancelled (cancelling the task that awaits hypercorn's serve
    # makes the cancellation escape its scope: hypercorn mixes in asyncio.TaskGroup).
    watching = anyio.CancelScope()

    async def watch_signals(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        with watching, anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if stop.is_set():
                    log.warning("%s again: stopping now, without waiting for requests", name)
                    _exit_now(1)
                log.info(
                    "%s: shutting down; no new connections, in-flight requests get up to "
                    "%.0f s (send it again to stop at once)",
                    name,
                    shutdown_timeout,
                )
                stop.set()

    drain_scope = anyio.CancelScope()

    async def drain() -> None:
        with drain_scope:
            await stop.wait()
        if not stop.is_set():
            return
        with anyio.move_on_after(shutdown_timeout + 10.0) as scope:
            await app.shutdown(shutdown_timeout)
        if scope.cancelled_caught:
            log.warning("the app did not shut down within %.0f s", shutdown_timeout + 10.0)

    async def shutdown_trigger() -> None:
        # hypercorn awaits this once the app has started and the socket is accepting.
        log.info("serving on %s", url)
        await stop.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(watch_signals)
        tg.start_soon(drain)
        await serve(request_log.logged(app), config, shutdown_trigger=shutdown_trigger)
        # The task group still waits for drain() when a signal started it.
        if not stop.is_set():
            drain_scope.cancel()
        watching.cancel()
