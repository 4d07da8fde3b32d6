"""Argument types for the command line: each parses one flag's text or raises
argparse.ArgumentTypeError with a one-line reason."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            expected = f"{low}..{high}" if high is not None else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range (expected {expected})")
        return value

    return parse


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is out of range (expected 0 < value <= 1)")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise argparse.ArgumentTypeError(f"{text} is out of range (expected seconds >= 0)")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range (expected seconds > 0)")
    return value
