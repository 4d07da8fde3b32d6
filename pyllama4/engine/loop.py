"""Engine: the step loop that turns requests into tokens (schedule → launch → commit →
deliver), and the requests' way in and out (submit, abort, stats).

Invariants:
- The loop runs on the model thread: it plans, runs and commits one step after another with no
  other thread on its way (no hand-off, no wake-up between two steps), and hands each committed
  step's outputs to the event loop in one call. The event loop makes their text (detokenizing,
  stop strings), streams them, and adds and ends requests. The scheduler and the engine's map
  of running completions are touched only under the core lock, by either thread.
- An idle engine waits on an event; it never spins.
- Every submitted request ends: with its output (finish_reason stop / length), with "abort" when
  the caller aborts it, or with "error" and a message if the step that carried it failed.
  A failing step fails only the requests it carried; the engine keeps running. The core is told
  each end with its true reason.
- Outputs of a request never depend on what else is in the batch (batch invariance is a tested
  property on CPU fp32), nor on chunked prefill, prefix reuse or retraction, nor on overlap.
- Overlap (on by default): the model thread runs at most MAX_AHEAD steps ahead of delivery; a
  request that a stop string ends may compute a token or two more, discarded. A step's outputs
  are handed over once the next step is queued on the device (on the CPU: planned), so that
  their text is made while it computes. Without overlap, each step's text is made before the
  next is planned.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from PIL.Image import Image as PILImage

from pyllama4._core import Scheduler
from pyllama4.detokenizer import IncrementalDetokenizer, StopStrings, compile_stops
from pyllama4.distributed.runtime import Workers
from pyllama4.engine import intake, offline, output
from pyllama4.engine.batch_log import BatchLog
from pyllama4.engine.build import build
from pyllama4.engine.config import EngineConfig
from pyllama4.engine.executor import EagleExecutor, StepExecutor
from pyllama4.engine.prompt_scores import PromptScores
from pyllama4.engine.records import Completion, Request, StepOutputs
from pyllama4.engine.steps import StepLoop
from pyllama4.grammar import GrammarCompiler, GrammarSpec
from pyllama4.memory import MemoryReport
from pyllama4.multimodal.features import PromptFeatures
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt
from pyllama4.multimodal.support import ImageSupport
from pyllama4.outputs import EngineStats, RequestMetrics, RequestOutput
from pyllama4.runner import MemoryPlan, ModelRunner
from pyllama4.sampler import Sampler
from pyllama4.sampling_params import SamplingParams
from pyllama4.speculative.eagle import EagleWorker

log = logging.getLogger("pyllama4.engine")
# A worker killed mid-step closes its sockets before its exit code shows (the kernel closes a
# process's files before it can be reaped): its peers' step can fail first.
WORKER_EXIT_GRACE_S = 2.0


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        *,
        scheduler: Scheduler | None = None,
        eos_token_ids: Sequence[int] = (),
        model_thread: ThreadPoolExecutor | None = None,
        images: ImageSupport | None = None,
        speculative: EagleWorker | None = None,
        workers: Workers | None = None,
        overlap: bool = True,
    ):
        """scheduler: the core scheduler the engine owns (default: runner.new_scheduler()).
        model_thread: the one thread that runs the loop and all of the model's torch work (built
        by from_checkpoint, which also loads the model there and places its CPU threads: torch's
        OpenMP settings are per calling thread).
        images: the vision tower and tiling settings; None for a text-only engine.
        speculative: EAGLE3 drafting (pyllama4.speculative.eagle), built on this runner: the
        steps then run on an EagleExecutor.
        workers: the tensor-parallel worker processes of a ShardedRunner (from_checkpoint's tp),
        stopped by close(). overlap: make a step's text (detokenizing, stop strings, streaming)
        while the next step computes (SGLang's overlap schedule; a request that a stop string
        ends then computes a token or two more, discarded); False: one after the other."""
        self.runner = runner
        self.images = images
        self.speculative = speculative
        self.workers = workers
        self.overlap = overlap
        self.failure: str | None = None  # set by fail(): the engine can no longer serve
        self.memory_report: MemoryReport | None = None  # the measured GPU plan (from_checkpoint)
        self.scheduler = scheduler or runner.new_scheduler()
        self.tokenizer = tokenizer
        self.vocab_size = runner.model.config.vocab_size
        eos = set(eos_token_ids) | set(runner.model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        sampler = Sampler(self.vocab_size, runner.device)
        self.executor: StepExecutor = (
            StepExecutor(runner, sampler, images)
            if speculative is None
            else EagleExecutor(runner, sampler, images, speculative)
        )
        self._core_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._by_core: dict[int, Completion] = {}
        self._requests: dict[str, Request] = {}
        # The core lock: the scheduler and _by_core are read and changed only under it (the
        # model thread plans and commits steps; the event loop adds, ends and forgets requests).
        self._lock = threading.Lock()
        self.steps = StepLoop(
            self.scheduler,
            self.executor,
            self._by_core,
            self._lock,
            overlap=overlap,
            deliver=self._deliver,
            fail=self._fail_step,
        )
        drafts = None if speculative is None else speculative.config.num_draft_tokens
        self.batch_log = BatchLog(
            self.scheduler,
            lambda: self._generation_tokens,
            self._graph_ran,
            "cuda graph" if runner.device.type == "cuda" else "cpu graph",
            spec=None if speculative is None else (speculative.stats, drafts),
        )  # its interval: the server's --decode-log-interval
        self.steps.batch_log = self.batch_log
        self._generation_tokens = 0
        self._grammars: GrammarCompiler | None = None
        self._running = False
        self._model_thread = model_thread or ThreadPoolExecutor(1, "pyllama4-model")

    @classmethod
    def from_config(cls, config: EngineConfig) -> Engine:
        """Loads config.checkpoint and its tokenizer (pyllama4.engine.build) into an engine."""
        parts = build(config)
        engine = cls(
            parts.runner,
            parts.tokenizer,
            scheduler=parts.scheduler,
            model_thread=parts.model_thread,
            images=parts.images,
            speculative=parts.speculative,
            workers=parts.workers,
            overlap=config.overlap,
        )
        engine.memory_report = parts.memory_report
        return engine

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, **options: Any) -> Engine:
        """Loads a checkpoint and its tokenizer; options are EngineConfig's fields (dtype,
        device, context_len, kv_tokens, tp, ...)."""
        return cls.from_config(EngineConfig(Path(checkpoint_dir), **options))

    def fail(self, message: str) -> None:
        """Marks the engine unable to serve (a tensor-parallel worker died): health checks
        report it; the server exits."""
        self.failure = message

    def close(self) -> None:
        """Stops the tensor-parallel workers (after the last step); a no-op without them."""
        if self.workers is None:
            return
        workers, self.workers = self.workers, None
        if self.failure is None:
            channel = self.runner.channel  # a ShardedRunner's
            self._model_thread.submit(channel.send, None).result()
        workers.stop()

    @property
    def memory(self) -> MemoryPlan:
        """The KV cache's plan: page counts, bytes per token, the most tokens it holds."""
        return self.runner.memory

    @property
    def weight_bytes(self) -> int:
        """The bytes of the weights this rank holds (the vision tower's included)."""
        modules = [self.runner.model] + ([self.images.tower] if self.images else [])
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    def _graph_ran(self, plan: Any) -> bool:
        graphs = self.runner.graphs
        return graphs is not None and graphs.size_for(plan) is not None

    @property
    def graph_sizes(self) -> list[int]:
        """The decode batch sizes that replay captured graphs (none on the CPU)."""
        return [] if self.runner.graphs is None else list(self.runner.graphs.sizes)

    # ---- the loop ---------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self.run)
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(*exc)

    async def run(self) -> None:
        """Runs the step loop on the model thread until cancelled (run it in a task group, or use
        `async with engine:`); outputs are delivered on this event loop (asyncio)."""
        if self._running:
            raise RuntimeError("the engine loop is already running")
        self._running = True
        steps = self.steps
        steps.start(asyncio.get_running_loop().call_soon_threadsafe)
        driving = self._model_thread.submit(steps.drive)
        try:
            await asyncio.wrap_future(driving)
        finally:
            steps.stop()
            with anyio.CancelScope(shield=True):
                # The last step commits and its outputs are delivered (this loop runs them).
                await asyncio.wait([asyncio.wrap_future(driving)])
            self._running = False

    def _fail_step(self, core_ids: list[int], message: str, waited: float = 0.0) -> None:
        """On the event loop: ends the requests of a step that failed, with the error. A step
        fails when a tensor-parallel worker dies: the engine is then failed at once, before the
        worker watch notices, so that those requests report it. The step can fail (the peer's
        connection closed) a moment before the worker's exit shows: a sharded engine's failed
        step waits for it up to WORKER_EXIT_GRACE_S, checking every 50 ms, without blocking."""
        dead = self.workers.dead() if self.workers is not None else None
        if self.workers is not None and dead is None and waited < WORKER_EXIT_GRACE_S:
            retry = partial(self._fail_step, core_ids, message, waited + 0.05)
            asyncio.get_running_loop().call_later(0.05, retry)
            return
        if dead is not None and self.failure is None:
            self.fail(dead)
        for core_id in core_ids:
            with self._lock:
                c = self._by_core.get(core_id)
            if c is not None:
                self._fail_request(c.request, message)

    def _deliver(self, outputs: StepOutputs) -> None:
        """Makes the text of a step's tokens and emits each touched request's output; tells the
        core about requests that output processing ended."""
        processed, ended_by_core, ended_here = output.process(outputs)
        self._generation_tokens += processed
        for c in ended_by_core:
            self._release(c)
        for c, reason in ended_here:
            with self._lock:
                self.scheduler.finish(c.core_id, reason)
            self._release(c)
        for request in outputs.requests.values():
            self._start_siblings(request)
            self._drop_features(request)
            self._emit(request)

    def _release(self, c: Completion) -> None:
        """Forgets a finished completion on the engine's side (the core has ended it)."""
        c.in_core = False
        with self._lock:
            self._by_core.pop(c.core_id, None)
        if c.request.finished:
            c.request.metrics.finish_time = time.monotonic()

    def _end(self, request: Request, reason: str) -> None:
        """Ends every unfinished completion of a request with `reason` and emits it."""
        for c in request.completions:
            if not c.finished:
                if c.in_core:
                    with self._lock:
                        self.scheduler.finish(c.core_id, "abort")
                c.finish_reason = reason
                self._release(c)
        request.deferred.clear()
        self._emit(request)

    def _start_siblings(self, request: Request) -> None:
        """n > 1: the other completions start once the first has its prompt in the cache."""
        if request.deferred and request.completions[0].token_ids:
            for c in request.deferred:
                self._add_to_core(c)
            request.deferred.clear()

    def _drop_features(self, request: Request) -> None:
        """Image features are dropped once every completion has its prompt computed."""
        if request.images is None or request.deferred:
            return
        if all(c.token_ids or c.finished for c in request.completions):
            with self._lock:  # the model thread reads them while it plans a step
                request.images.drop()

    def _emit(self, request: Request) -> None:
        try:
            request.send.send_nowait(request.output())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the caller stopped listening; abort() cleans up
        if request.finished:
            request.send.close()
            self._requests.pop(request.request_id, None)

    def _fail_request(self, request: Request, message: str) -> None:
        """Ends a request whose step failed, with finish_reason "error" and the message."""
        request.error = message
        self._end(request, "error")

    # ---- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def image_prompt(
        self, prompt: str | Sequence[int], images: Sequence[ImageInput | PILImage]
    ) -> ImagePrompt:
        """A prompt with one `<|image|>` per image, expanded for submit(); PIL images are tiled
        here. ValueError if this engine takes no images or placeholders and images differ."""
        if self.images is None:
            raise ValueError(
                "this engine takes no images: load a multimodal checkpoint with "
                "enable_multimodal=True (the server's --enable-multimodal)"
            )
        config = self.images.processor
        tiled = [
            i if isinstance(i, ImageInput) else ImageInput.from_image(i, config) for i in images
        ]
        return self.images.expand(self.tokenize(prompt), tiled)

    @property
    def grammars(self) -> GrammarCompiler:
        """The structured-output grammar compiler (built on first use; its cache is shared)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(
                self.tokenizer, self.vocab_size, sorted(self.eos_token_ids)
            )
        return self._grammars

    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compiles (and caches) a grammar in a worker thread, so that submit() finds it ready.
        Raises GrammarError (a ValueError) for an invalid schema, regex or grammar."""
        await anyio.to_thread.run_sync(self.grammars.compile, spec)

    def submit(
        self,
        prompt: str | Sequence[int] | ImagePrompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queues a request; returns the stream of its outputs (the last has finished=True).
        Image + text prompts come from image_prompt().

        Raises ValueError at once for a request that can never run (empty prompt, unknown token
        ids, too long for the context, a duplicate request id, an invalid grammar). A text prompt
        is tokenized here, and a grammar or stop strings not compiled yet (see compile_grammar,
        detokenizer.compile_stops) are compiled here, blocking: a server hands token ids and
        compiles both in worker threads first. The n completions share the compiled stops."""
        params = params or SamplingParams()
        params.validate()
        compiled = self.grammars.compile(params.grammar) if params.grammar else None
        prompt_ids, key_ids = intake.prompt_ids(prompt, self.tokenize, self.vocab_size, self.images)
        intake.check_token_ids(params, self.vocab_size)
        intake.check_prompt_logprobs(params, len(prompt_ids), self.speculative is not None)
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        request = Request(
            request_id, prompt_ids, params, send, RequestMetrics(time.monotonic()), key_ids
        )
        if params.prompt_logprobs is not None:
            request.prompt_scores = PromptScores(
                prompt_ids, params.prompt_logprobs_start, params.prompt_logprobs
            )
        if isinstance(prompt, ImagePrompt) and prompt.images:
            request.images = PromptFeatures(prompt)
        stops = compile_stops(tuple(params.stop))
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        for index in range(params.n):
            c = Completion(
                core_id=next(self._core_ids),
                index=index,
                request=request,
                params=params,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, params.skip_special_tokens
                ),
                stops=StopStrings(stops, params.include_stop_str_in_output),
                logprobs=[] if params.logprobs is not None else None,
                stop_ids=stop_ids,
                constraint=None if compiled is None else self.grammars.constraint(compiled),
            )
            request.completions.append(c)
        self._add_to_core(request.completions[0])  # raises ValueError before anything is kept
        request.deferred = request.completions[1:]
        self._requests[request_id] = request
        return _stream(receive, self, request_id)

    def _add_to_core(self, c: Completion) -> None:
        scores = c.request.prompt_scores
        max_cached = -1 if scores is None or c.index else scores.max_cached
        with self._lock:
            self.scheduler.add_request(
                c.core_id,
                c.request.key_ids,
                max_new_tokens=c.params.max_tokens,
                stop_token_ids=sorted(c.stop_ids),
                reserve=self.executor.reserve(c.params, c.constraint is not None),
                max_cached=max_cached,
            )
            c.in_core = True
            self._by_core[c.core_id] = c
        self.steps.wake()

    def abort(self, request_id: str) -> bool:
        """Ends a request at once (finish_reason "abort"); its pages are released now or, if
        its step is running, when that step commits. Returns False for an unknown request."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._end(request, "abort")
        return True

    def abort_all(self) -> int:
        """Aborts every request (a server shutting down); returns how many there were."""
        request_ids = list(self._requests)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    def flush_cache(self) -> bool:
        """Evicts every cached prefix if no request is queued or running (under the core lock,
        so never inside a step's planning or commit); False, and nothing done, otherwise."""
        with self._lock:
            s = self.scheduler.stats()
            if self._requests or s.num_running or s.num_waiting:
                return False
            self.scheduler.flush_cache()
            return True

    def stats(self) -> EngineStats:
        with self._lock:
            s = self.scheduler.stats()
        spec = self.speculative.stats if self.speculative else None
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            global_pages_used=s.global_total - s.global_free,
            global_pages_held=s.global_total - s.global_free - s.global_cached,
            global_pages_total=s.global_total,
            local_pages_used=s.local_total - s.local_free,
            local_pages_total=s.local_total,
            prompt_tokens=s.prompt_tokens,
            cached_prompt_tokens=s.cached_tokens,
            generation_tokens=self._generation_tokens,
            num_retractions=s.num_retractions,
            num_steps=s.num_steps,
            images_encoded=self.steps.images_encoded,
            spec_verify_steps=spec.verify_steps if spec else 0,
            spec_accepted_tokens=spec.accepted_tokens if spec else 0,
        )

    # ---- offline ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str | Sequence[int] | ImagePrompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Runs a batch to completion (no event loop of the caller's needed); final outputs in
        prompt order. Image + text prompts come from image_prompt()."""
        return offline.generate(self, prompts, params)


async def _stream(receive: Any, engine: Engine, request_id: str) -> AsyncIterator[RequestOutput]:
    """The caller's view of a request; leaving it early (or being cancelled) aborts the request."""
    finished = False
    try:
        async with receive:
            async for out in receive:
                finished = out.finished
                yield out
    finally:
        if not finished:
            engine.abort(request_id)
