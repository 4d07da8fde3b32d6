"""pyllama4.Engine: the step loop that turns requests into tokens.

Invariants:
- One task runs the loop; only the event-loop thread touches the core scheduler (submit, abort
  and commit all run there). The forward pass and the sampler run in a worker thread on a plan
  that never changes, so the event loop keeps serving while the model computes.
- An idle engine waits on an event; it never spins.
- Every submitted request ends: with its output (finish_reason stop / length), with "abort" when
  the caller aborts it, or with "error" and a message if the step that carried it failed.
  A failing step fails only the requests it carried; the engine keeps running.
- Outputs of a request never depend on what else is in the batch (batch invariance is a tested
  property on CPU fp32), nor on chunked prefill, prefix reuse or retraction, nor on overlap.
- Overlap (on by default): a committed step's token ids are recorded at once (the next step's
  penalties read them); their text is made and streamed once the next step is queued on the
  device, while it computes. The only wait on the device per step is for its sampled tokens.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch
import torch.distributed as dist
from anyio.streams.memory import MemoryObjectSendStream
from PIL.Image import Image as PILImage

from pyllama4 import kernels
from pyllama4.config import TextConfig
from pyllama4.detokenizer import IncrementalDetokenizer, StopStrings
from pyllama4.distributed.parallel import (
    SINGLE,
    TensorParallel,
    attention_heads,
    init_tensor_parallel,
)
from pyllama4.distributed.runtime import (
    BuildRunner,
    PlanChannel,
    ShardedRunner,
    Workers,
    WorkerSpec,
    cpu_threads_per_rank,
    free_init_method,
)
from pyllama4.grammar import Constraint, GrammarCompiler, GrammarSpec
from pyllama4.memory import CudaMeter, MemoryReport
from pyllama4.memory import measure as measure_memory
from pyllama4.model.eagle3 import load_eagle3
from pyllama4.model.load import load_model
from pyllama4.multimodal.features import ImageFeed, PromptFeatures
from pyllama4.multimodal.inputs import ImageInput, ImagePrompt
from pyllama4.multimodal.support import ImageSupport
from pyllama4.outputs import (
    CompletionOutput,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from pyllama4.runner import MAX_RUNNING, MAX_STEP_TOKENS, MemoryPlan, ModelRunner
from pyllama4.sampler import SampleOutput, Sampler, SampleRequest
from pyllama4.sampling_params import SamplingParams
from pyllama4.speculative.eagle import (
    EagleWorker,
    SpecConfig,
    draft_kv_bytes_per_token,
    eligible,
)

log = logging.getLogger("pyllama4.engine")


@dataclass
class _Completion:
    """One completion of a request: one request in the core scheduler."""

    core_id: int
    index: int
    group: _Group
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    stop_ids: frozenset[int]
    pieces: list[str] = field(default_factory=list)  # output text, in the pieces it came in
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    emitted: tuple[int, int] = (0, 0)  # (pieces, tokens) in outputs already sent
    in_core: bool = False
    last_token_time: float | None = None
    constraint: Constraint | None = None  # structured output: advanced on the model thread
    verify_steps: int = 0  # speculative steps that verified drafts for this completion

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _StepOutputs:
    """A committed step's tokens, recorded in their completions' token ids, their text not
    made yet: (completion, its fresh tokens, its logprob row, the core's finish) per row."""

    time: float
    rows: list[tuple[_Completion, list[int], Any, Any]] = field(default_factory=list)
    groups: dict[str, _Group] = field(default_factory=dict)  # the requests the step touched


@dataclass
class _Group:
    """One submitted request (n completions) and the stream its caller reads."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    send: MemoryObjectSendStream[RequestOutput]
    metrics: RequestMetrics
    key_ids: np.ndarray  # the radix-cache key of the prompt (image positions keyed by content)
    images: PromptFeatures | None = None  # image features, until the prompt is prefilled
    completions: list[_Completion] = field(default_factory=list)
    deferred: list[_Completion] = field(default_factory=list)  # siblings waiting for the prefix
    cached_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Any,
        *,
        eos_token_ids: Sequence[int] = (),
        model_thread: ThreadPoolExecutor | None = None,
        images: ImageSupport | None = None,
        speculative: EagleWorker | None = None,
        workers: Workers | None = None,
        overlap: bool = True,
    ):
        """model_thread: the one thread that runs all of the model's torch work (built by
        from_checkpoint, which also loads the model there). On the CPU, torch's OpenMP threads
        are per calling thread: switching threads costs ~1.5x per step on 2 cores, measured.
        images: the vision tower and tiling settings; None for a text-only engine.
        speculative: EAGLE3 drafting (pyllama4.speculative.eagle), built on this runner.
        workers: the tensor-parallel worker processes of a ShardedRunner (from_checkpoint's tp),
        stopped by close(). overlap: make a step's text (detokenizing, stop strings, streaming)
        while the next step computes (SGLang's overlap schedule; a request that a stop string
        ends then computes one token more, discarded); False: one after the other."""
        self.runner = runner
        self.images = images
        self.speculative = speculative
        self.workers = workers
        self.overlap = overlap
        self.failure: str | None = None  # set by fail(): the engine can no longer serve
        self.memory_report: MemoryReport | None = None  # the measured GPU plan (from_checkpoint)
        self.scheduler = runner.scheduler
        self.tokenizer = tokenizer
        self.vocab_size = runner.model.config.vocab_size
        eos = set(eos_token_ids) | set(runner.model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.sampler = Sampler(self.vocab_size, runner.device)
        self._core_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._by_core: dict[int, _Completion] = {}
        self._groups: dict[str, _Group] = {}
        self._wake = anyio.Event()
        self._generation_tokens = 0
        self._images_encoded = 0
        self._grammars: GrammarCompiler | None = None
        self._running = False
        self._model_thread = model_thread or ThreadPoolExecutor(1, "pyllama4-model")

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        *,
        dtype: torch.dtype | str = torch.bfloat16,
        device: torch.device | str = "cpu",
        context_len: int | None = None,
        mem_fraction_static: float = 0.85,
        progress: bool = True,
        enable_multimodal: bool = False,
        max_image_tiles: int | None = None,
        quantization: str | None = None,
        fp8_format: str = "e4m3fn",
        speculative_draft: str | Path | None = None,
        speculative: SpecConfig | None = None,
        tp: int = 1,
        nnodes: int = 1,
        dist_init_method: str | None = None,
        cuda_graph_max_bs: int = 0,
        overlap: bool = True,
        **runner_options: Any,
    ) -> Engine:
        """Loads a checkpoint and its tokenizer; runner_options go to ModelRunner (kv_tokens or
        kv_bytes, page_size, max_running, max_step_tokens, enable_prefix_cache, policy).
        enable_multimodal also loads the vision tower (ValueError for a text-only checkpoint);
        max_image_tiles overrides the checkpoint's preprocessor setting. quantization="fp8"
        quantizes a bf16 checkpoint at load; FP8 checkpoints load as FP8 by themselves;
        fp8_format is e4m3fn, or e4m3fnuz for MI300. speculative_draft: an EAGLE3 draft
        checkpoint (SGLang's layout) to speculate with, by `speculative` (SpecConfig()'s
        defaults without); its KV is added to the global pool's cost per token. tp > 1: the
        model is sharded over tp ranks (pyllama4.distributed): this process is rank 0 and spawns
        its node's other ranks (1..tp/nnodes-1) as worker processes, the other nodes theirs,
        all joined at dist_init_method (default: a free local port); the KV budget is per rank.

        cuda_graph_max_bs > 0 (a GPU): decode steps of up to that many requests replay
        captured graphs (pyllama4.graphs), on every tensor-parallel rank.

        Without kv_tokens / kv_bytes the KV budget is, on a GPU, mem_fraction_static of its
        memory less what the loaded model, a warm-up's activations and the decode graphs take,
        measured (pyllama4.memory; under tensor parallelism on rank 0, every rank taking its
        page counts); on the CPU, a quarter of the machine's memory, at most
        1 GiB."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)

        if tp > 1 and speculative_draft is not None:
            raise ValueError("EAGLE3 with tensor parallelism is not supported yet (use tp 1)")
        options = dict(runner_options)
        sharded = None
        if tp > 1:
            _check_shardable(TextConfig.from_checkpoint(checkpoint_dir), tp)
            sharded = _start_workers(
                checkpoint_dir,
                dtype,
                device,
                tp,
                nnodes,
                dist_init_method,
                context_len,
                options,
            )
        memory_report: list[MemoryReport] = []

        def build() -> tuple[ModelRunner, ImageSupport | None, EagleWorker | None]:
            model_device = device
            if sharded is not None:
                model_device = sharded.join()
            model = load_model(
                checkpoint_dir,
                dtype=dtype,
                device=model_device,
                progress=progress,
                quantization=quantization,
                fp8_format=fp8_format,
                tp=sharded.tp if sharded is not None else SINGLE,
            )
            images = None
            if enable_multimodal:
                images = ImageSupport.load(
                    checkpoint_dir,
                    tokenizer,
                    dtype=next(model.parameters()).dtype,
                    device=device,
                    max_tiles=max_image_tiles,
                    progress=progress,
                )
            context = context_len or model.config.max_position_embeddings
            draft = None
            if speculative_draft is not None:
                c = model.config
                model_dtype = next(model.parameters()).dtype
                draft = load_eagle3(
                    speculative_draft,
                    c.hidden_size,
                    c.vocab_size,
                    c.num_hidden_layers,
                    dtype=model_dtype,
                    device=device,
                ).eval()
                extra = draft_kv_bytes_per_token(draft, model_dtype)
                options["extra_global_bytes_per_token"] = extra
            on_gpu = next(model.parameters()).is_cuda

            def build_runner(more: dict[str, Any]) -> ModelRunner:
                if sharded is not None:
                    return sharded.runner(model, context, {**options, **more})
                return ModelRunner(model, context_len=context, **{**options, **more})

            if "kv_tokens" not in options and "kv_bytes" not in options:
                if on_gpu:
                    report = measure_memory(
                        lambda tokens: build_runner({"kv_tokens": tokens}),
                        CudaMeter(next(model.parameters()).device),
                        fraction=mem_fraction_static,
                        step_tokens=options.get("max_step_tokens", MAX_STEP_TOKENS),
                        rows=options.get("max_running", MAX_RUNNING),
                        graph_max_bs=cuda_graph_max_bs,
                    )
                    report.check()
                    memory_report.append(report)
                    options["kv_bytes"] = report.kv_bytes
                else:
                    options["kv_bytes"] = default_kv_bytes(model, mem_fraction_static)
            runner = build_runner({})
            if on_gpu and cuda_graph_max_bs:
                runner.capture_graphs(cuda_graph_max_bs)
            worker = None
            if draft is not None:
                worker = EagleWorker(runner, draft, speculative or SpecConfig())
            return runner, images, worker

        model_thread = ThreadPoolExecutor(1, "pyllama4-model")
        try:
            runner, images, worker = model_thread.submit(build).result()
        except BaseException:
            if sharded is not None:
                sharded.workers.stop(timeout=1.0)
                if dist.is_initialized():
                    dist.destroy_process_group()
            raise
        log.debug(runner.memory.describe())
        log.info("GPU kernels: %s", kernels.describe(next(runner.model.parameters()).device))
        engine = cls(
            runner,
            tokenizer,
            model_thread=model_thread,
            images=images,
            speculative=worker,
            workers=None if sharded is None else sharded.workers,
            overlap=overlap,
        )
        engine.memory_report = memory_report[0] if memory_report else None
        return engine

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
        """The step loop. Run it in a task group (or use `async with engine:`)."""
        if self._running:
            raise RuntimeError("the engine loop is already running")
        self._running = True
        pending: _StepOutputs | None = None  # the last step's outputs, their text not made yet
        try:
            while True:
                await anyio.lowlevel.checkpoint()  # cancellation lands between steps
                if not self.scheduler.has_work():
                    if pending is not None:
                        self._deliver(pending)
                        pending = None
                        continue  # delivering may release requests (n > 1 siblings)
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                outputs = await self._step(pending)
                pending = None
                if self.overlap:
                    pending = outputs
                else:
                    self._deliver(outputs)
        finally:
            self._running = False
            if pending is not None:
                self._deliver(pending)

    async def _step(self, previous: _StepOutputs | None) -> _StepOutputs | None:
        """Runs one step; returns its tokens recorded, their text not made yet. previous: the
        last step's outputs, whose text is made (and streamed) while this step computes."""
        plan = self.scheduler.schedule()
        if plan.num_requests == 0:
            self._deliver(previous)
            return None
        sampled_ids = plan.request_ids[plan.sample_requests].tolist()
        completions = [self._by_core[i] for i in sampled_ids]
        requests = [self._sample_request(c) for c in completions]
        for c in completions:  # the cache hit is known once the request is admitted
            if c.index == 0 and not c.token_ids:
                c.group.cached_tokens = self.scheduler.request_info(c.core_id).cached_tokens
        feed = self._image_feed(plan)
        next_prompt = self._next_prompt_tokens(plan) if self.speculative else None
        if any(r.constraint is not None for r in requests):
            # A grammar advances on the model thread; its state must not move under _deliver.
            self._deliver(previous)
            previous = None
        launched: Future[None] = Future()
        future = self._model_thread.submit(
            self._forward, plan, requests, completions, feed, next_prompt, launched
        )
        try:
            # A step always completes and commits, even when the loop is being cancelled:
            # otherwise the core would keep a plan in flight and its requests forever.
            with anyio.CancelScope(shield=True):
                if previous is not None:
                    # The last step's text, once this step is queued on the device: made any
                    # earlier, it would hold the GIL the model thread needs to launch the step.
                    await anyio.to_thread.run_sync(launched.result)
                    self._deliver(previous)
                tokens, counts, verified, logprobs = await anyio.to_thread.run_sync(future.result)
        except Exception as e:  # noqa: BLE001 - any failure of a step fails its requests only
            log.exception("step failed")
            self.scheduler.commit(np.zeros(plan.num_samples, dtype=np.int32))
            for core_id in plan.request_ids.tolist():
                c = self._by_core.get(core_id)
                if c is not None:
                    self._fail(c.group, f"{type(e).__name__}: {e}")
            return None
        finished = {f.request_id: f for f in self.scheduler.commit(tokens, counts)}
        if feed is not None:
            self._images_encoded += feed.encoded
        outputs = _StepOutputs(time.monotonic())
        sizes = np.ones(len(tokens), dtype=np.int64) if counts is None else counts
        ends = np.cumsum(sizes).tolist()
        flat = tokens.tolist()
        for row, c in enumerate(completions):
            outputs.groups[c.group.request_id] = c.group
            if c.finished:  # aborted while in flight
                continue
            fresh = flat[ends[row] - int(sizes[row]) : ends[row]]
            c.verify_steps += bool(verified is not None and verified[row])
            done = finished.get(c.core_id)
            if done is not None:  # the core stopped at a stop token or the length limit
                fresh = fresh[: done.num_output_tokens - len(c.token_ids)]
            # Token ids now (the next step's penalties and min_tokens read them), text later.
            c.token_ids.extend(fresh)
            outputs.rows.append((c, fresh, logprobs[row], done))
        return outputs

    def _deliver(self, outputs: _StepOutputs | None) -> None:
        """Makes the text of a step's tokens (detokenizer, stop strings, logprobs, finish
        reasons) and emits each touched request's output. A completion that ends before its
        last fresh token (a stop string inside a multi-token speculative step) drops the rest:
        its token list is replaced, never cut in place (the model thread may be reading it)."""
        if outputs is None:
            return
        for c, fresh, logprob, done in outputs.rows:
            if c.finished:  # aborted since the step committed
                continue
            kept = len(c.token_ids) - len(fresh)
            for j, token in enumerate(fresh):
                self._generation_tokens += 1
                last = j == len(fresh) - 1
                self._on_token(c, token, logprob, done if last else None, outputs.time)
                if c.finished:
                    if not last:
                        c.token_ids = c.token_ids[: kept + j + 1]
                    break
        for group in outputs.groups.values():
            self._release_siblings(group)
            self._drop_features(group)
            self._emit(group)

    def _image_feed(self, plan: Any) -> ImageFeed | None:
        """The image positions the plan's prefill chunks compute (decodes never hold any)."""
        feed = ImageFeed()
        request_ids, starts = plan.request_ids, plan.query_start
        for r in range(plan.num_decodes, plan.num_requests):
            c = self._by_core.get(int(request_ids[r]))
            if c is not None and c.group.images is not None:
                start = int(plan.context_lens[r])
                end = start + int(starts[r + 1] - starts[r])
                feed.add(c.group.images, start, end, int(starts[r]) - start)
        return feed or None

    def _next_prompt_tokens(self, plan: Any) -> np.ndarray:
        """[R]: for each prefill chunk that stops short of its prompt's end, the prompt token
        after it (what the EAGLE3 catch-up pairs with its last position); 0 elsewhere."""
        out = np.zeros(plan.num_requests, dtype=np.int64)
        starts, request_ids = plan.query_start, plan.request_ids
        for r in range(plan.num_decodes, plan.num_requests):
            c = self._by_core.get(int(request_ids[r]))
            end = int(plan.context_lens[r]) + int(starts[r + 1] - starts[r])
            if c is not None and end < len(c.group.prompt_ids):
                out[r] = c.group.prompt_ids[end]
        return out

    def _forward(
        self,
        plan: Any,
        requests: list[SampleRequest],
        completions: list[_Completion],
        feed: ImageFeed | None,
        next_prompt: np.ndarray | None,
        launched: Future[None],
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, list[Any]]:
        """On the model thread: encode images, forward, sample, bring the results to the host.
        Returns (tokens, counts, verified, logprob rows): counts / verified (per sample row: the
        tokens it commits, and whether it verified drafts) are None without speculation.
        `launched` is set once the step's device work is queued (on a GPU, before the wait for
        its tokens; always, also when the step fails)."""
        try:
            embeds = None
            if feed is not None:
                assert self.images is not None  # only image prompts have features to feed
                embeds = feed.gather(self.images.tower, self.runner.device)
            if self.speculative is not None:
                assert next_prompt is not None
                result = self.speculative.step(plan, requests, self.sampler, next_prompt, embeds)
                out, tokens, counts = result.sampled, result.tokens, result.counts
                verified = result.verified
            else:
                out = self.sampler(self.runner.forward(plan, embeds), requests)
                launched.set_result(None)
                tokens = out.tokens.to(torch.int32).cpu().numpy()
                counts = verified = None
        finally:
            if not launched.done():
                launched.set_result(None)
        grammar_rows = [row for row, r in enumerate(requests) if r.constraint is not None]
        if grammar_rows:  # grammar rows never speculate: their token is the sampled one
            sampled = out.tokens.cpu().tolist()
            for row in grammar_rows:
                if not requests[row].constraint.accept(sampled[row]):
                    log.error("a sampled token broke its grammar (masking failed)")
        return tokens, counts, verified, self._logprob_rows(out, completions)

    def _sample_request(self, c: _Completion) -> SampleRequest:
        return SampleRequest(
            params=c.params,
            prompt_ids=c.group.prompt_ids,
            output_ids=c.token_ids,
            stop_ids=c.stop_ids,
            seed_offset=c.index,
            constraint=c.constraint,
        )

    @staticmethod
    def _logprob_rows(out: SampleOutput, completions: list[_Completion]) -> list[Any]:
        if out.logprobs is None:
            return [None] * len(completions)
        lp = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        rows: list[Any] = []
        for row, c in enumerate(completions):
            k = c.params.logprobs
            if k is None:
                rows.append(None)
                continue
            top = list(zip(top_ids[row][:k], top_lp[row][:k], strict=True)) if top_ids else []
            rows.append((lp[row], top))
        return rows

    def _on_token(self, c: _Completion, token: int, logprob: Any, done: Any, now: float) -> None:
        metrics = c.group.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        if c.last_token_time is not None:
            metrics.sum_inter_token += now - c.last_token_time
            metrics.num_token_times += 1
        c.last_token_time = now
        if logprob is not None:
            c.logprobs.append(TokenLogprob(token, logprob[0], logprob[1]))
        by_stop_token = done is not None and done.reason == "stop"
        # A stop token ends the text: its own text is not part of the output.
        text = "" if by_stop_token else c.detokenizer.push([token])
        if done is not None:
            text += c.detokenizer.finish()
        emit, stopped = c.stops.push(text)
        c.pieces.append(emit)
        if done is None and c.constraint is not None and c.constraint.finished:
            # The grammar ended on a stop token the request does not stop at (ignore_eos).
            c.pieces.append(c.stops.finish())
            c.stop_reason = token
            self._finish(c, "stop")
            self.scheduler.abort(c.core_id)
        elif stopped:
            c.stop_reason = c.stops.matched
            self._finish(c, "stop")
            if done is None:
                self.scheduler.abort(c.core_id)
        elif done is not None:
            c.pieces.append(c.stops.finish())
            c.stop_reason = token if by_stop_token else None
            self._finish(c, "stop" if by_stop_token else "length")

    def _finish(self, c: _Completion, reason: str) -> None:
        c.finish_reason = reason
        c.in_core = False
        self._by_core.pop(c.core_id, None)
        if c.group.finished:
            c.group.metrics.finish_time = time.monotonic()

    def _release_siblings(self, group: _Group) -> None:
        """n > 1: the other completions start once the first has its prompt in the cache."""
        if group.deferred and group.completions[0].token_ids:
            for c in group.deferred:
                self._add_to_core(c)
            group.deferred.clear()

    def _drop_features(self, group: _Group) -> None:
        """Image features are dropped once every completion has its prompt computed."""
        if group.images is None or group.deferred:
            return
        if all(c.token_ids or c.finished for c in group.completions):
            group.images.drop()

    def _emit(self, group: _Group) -> None:
        output = RequestOutput(
            request_id=group.request_id,
            prompt_token_ids=group.prompt_ids,
            outputs=[_snapshot(c) for c in group.completions],
            finished=group.finished,
            cached_tokens=group.cached_tokens,
            metrics=group.metrics,
            error=group.error,
        )
        for c in group.completions:
            c.emitted = (len(c.pieces), len(c.token_ids))
        try:
            group.send.send_nowait(output)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the caller stopped listening; abort() cleans up
        if group.finished:
            group.send.close()
            self._groups.pop(group.request_id, None)

    def _fail(self, group: _Group, message: str) -> None:
        group.error = message
        for c in group.completions:
            if not c.finished:
                if c.in_core:
                    self.scheduler.abort(c.core_id)
                self._finish(c, "error")
        group.deferred.clear()
        self._emit(group)

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
        ids, too long for the context, a duplicate request id, an invalid grammar). A grammar
        not compiled yet (see compile_grammar) is compiled here, blocking."""
        params = params or SamplingParams()
        params.validate()
        compiled = self.grammars.compile(params.grammar) if params.grammar else None
        if isinstance(prompt, ImagePrompt):
            if self.images is None:
                raise ValueError("this engine takes no images (enable_multimodal is off)")
            prompt_ids, key_ids = prompt.token_ids, prompt.key_ids
        else:
            prompt_ids = self.tokenize(prompt)
            key_ids = np.asarray(prompt_ids, dtype=np.int32)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        for name, ids in (
            ("logit_bias", params.logit_bias),
            ("stop_token_ids", params.stop_token_ids),
        ):
            if any(t >= self.vocab_size for t in ids):
                raise ValueError(
                    f"{name}: token ids must be below the vocabulary size {self.vocab_size}"
                )
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        group = _Group(
            request_id, prompt_ids, params, send, RequestMetrics(time.monotonic()), key_ids
        )
        if isinstance(prompt, ImagePrompt) and prompt.images:
            group.images = PromptFeatures(prompt)
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_token_ids
        )
        for index in range(params.n):
            c = _Completion(
                core_id=next(self._core_ids),
                index=index,
                group=group,
                params=params,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, params.skip_special_tokens
                ),
                stops=StopStrings(params.stop, params.include_stop_str_in_output),
                logprobs=[] if params.logprobs is not None else None,
                stop_ids=stop_ids,
                constraint=None if compiled is None else self.grammars.constraint(compiled),
            )
            group.completions.append(c)
        self._add_to_core(group.completions[0])  # raises ValueError before anything is kept
        group.deferred = group.completions[1:]
        self._groups[request_id] = group
        return _stream(receive, self, request_id)

    def _add_to_core(self, c: _Completion) -> None:
        reserve = 0
        if self.speculative is not None and eligible(c.params, c.constraint is not None):
            reserve = self.speculative.config.reserve
        self.scheduler.add_request(
            c.core_id,
            c.group.key_ids,
            max_new_tokens=c.params.max_tokens,
            stop_token_ids=sorted(c.stop_ids),
            reserve=reserve,
        )
        c.in_core = True
        self._by_core[c.core_id] = c
        self._wake.set()

    def abort(self, request_id: str) -> bool:
        """Ends a request at once (finish_reason "abort"); its pages are released now or, if
        its step is running, when that step commits. Returns False for an unknown request."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        for c in group.completions:
            if not c.finished:
                if c.in_core:
                    self.scheduler.abort(c.core_id)
                self._finish(c, "abort")
        group.deferred.clear()
        self._emit(group)
        return True

    def abort_all(self) -> int:
        """Aborts every request (a server shutting down); returns how many there were."""
        request_ids = list(self._groups)
        for request_id in request_ids:
            self.abort(request_id)
        return len(request_ids)

    @property
    def memory(self) -> MemoryPlan:
        """The KV cache's plan: page counts, bytes per token, the most tokens it holds."""
        return self.runner.memory

    def stats(self) -> EngineStats:
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
            images_encoded=self._images_encoded,
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
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")

        async def main() -> list[RequestOutput]:
            results: list[RequestOutput | None] = [None] * len(prompts)
            streams = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]

            async def collect(i: int) -> None:
                async for out in streams[i]:
                    results[i] = out

            async with self:
                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(collect, i)
            return [r for r in results if r is not None]

        return anyio.run(main)


@dataclass
class _Sharded:
    """Rank 0 of a tensor-parallel engine while it loads: the spawned workers and the group."""

    workers: Workers
    size: int
    init_method: str
    device: str
    tp: Any = None
    channel: PlanChannel | None = None

    def join(self) -> str:
        """Joins the group (on the model thread); returns rank 0's device."""
        device = self.device
        if device != "cpu":
            device = "cuda:0"
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(cpu_threads_per_rank(len(self.workers.processes) + 1))
        self.tp = init_tensor_parallel(0, self.size, self.init_method)
        return device

    def runner(self, model: Any, context: int, options: dict[str, Any]) -> ShardedRunner:
        """Rank 0's runner; the workers build theirs with its exact page counts."""
        if self.channel is None:
            self.channel = PlanChannel(self.tp)
        runner = ShardedRunner(model, context_len=context, **options)
        runner.channel = self.channel
        pages = (runner.memory.global_pages, runner.memory.local_pages)
        self.channel.send(BuildRunner(pages))
        return runner


def _check_shardable(config: TextConfig, size: int) -> None:
    """ValueError, before any process starts, when the model does not split in `size`."""
    tp = TensorParallel(0, size)
    attention_heads(config.num_attention_heads, config.num_key_value_heads, tp)
    tp.split(config.vocab_size, "the vocabulary")


def _start_workers(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | str,
    device: torch.device | str,
    size: int,
    nnodes: int,
    init_method: str | None,
    context_len: int | None,
    options: dict[str, Any],
) -> _Sharded:
    """Spawns this node's ranks 1..size/nnodes-1 (they load their shards while rank 0 loads
    its own)."""
    device = str(device)
    context = context_len or TextConfig.from_checkpoint(checkpoint_dir).max_position_embeddings
    worker_options = {k: v for k, v in options.items() if k not in ("kv_tokens", "kv_bytes")}
    init_method = init_method or free_init_method()
    spec = WorkerSpec(
        checkpoint=str(checkpoint_dir),
        dtype=dtype,
        device="cpu" if device == "cpu" else "cuda",
        context_len=context,
        runner_options=worker_options,
        size=size,
        init_method=init_method,
        threads=cpu_threads_per_rank(size // nnodes) if device == "cpu" else None,
    )
    workers = Workers.spawn(spec, range(1, size // nnodes))
    return _Sharded(workers, size, init_method, device)


def default_kv_bytes(model: torch.nn.Module, mem_fraction_static: float) -> int:
    device = next(model.parameters()).device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(0, int(total * mem_fraction_static) - (total - free))
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(1 << 30, physical // 4)


async def _stream(receive: Any, engine: Engine, request_id: str) -> AsyncIterator[RequestOutput]:
    """The caller's view of a request; leaving it early (or being cancelled) aborts the request."""
    finished = False
    try:
        async with receive:
            async for output in receive:
                finished = output.finished
                yield output
    finally:
        if not finished:
            engine.abort(request_id)


def _snapshot(c: _Completion) -> CompletionOutput:
    return CompletionOutput(
        c.index,
        c.pieces,
        c.token_ids,
        c.logprobs,
        c.finish_reason,
        c.stop_reason,
        c.emitted,
        c.verify_steps,
    )
