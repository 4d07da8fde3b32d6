"""pyllama4: a serving engine for Llama 4 with an OpenAI-compatible API.

The compiled core (`pyllama4._core`) owns all serving bookkeeping: the paged KV pools, the radix
prefix cache and the batch scheduler. Everything above it works on the StepPlans it produces.

Invariant: `import pyllama4` gives one complete package, the same in every directory. In a source
checkout's root (`python -m pyllama4...`, or `python` started there) this folder comes first on
sys.path, yet lacks what `pip install .` builds and moves in: the compiled core and
`pyllama4.server` (server/ at the repository root). There it hands itself over to the installed
pyllama4 found further down sys.path, so a command runs what was installed, as `pyllama4-serve`
does; with no installed pyllama4 the core's import error says to install it.
"""

import sys
from pathlib import Path


def _installed_elsewhere() -> Path | None:
    """The installed pyllama4 to hand over to, when this folder is a source checkout's."""
    here = Path(__file__).resolve().parent
    if (here / "server").is_dir():  # installed: the wheel puts server/ inside the package
        return None
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / "pyllama4"
        if candidate != here and (candidate / "server" / "__init__.py").is_file():
            return candidate
    return None


def _hand_over(installed: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        __name__, installed / "__init__.py", submodule_search_locations=[str(installed)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module  # what `import pyllama4` returns once this file has run
    spec.loader.exec_module(module)


if (_installed := _installed_elsewhere()) is not None:
    _hand_over(_installed)
else:
    try:
        from pyllama4._core import (
            Finished,
            KVPool,
            RadixCache,
            RadixCacheStats,
            RequestInfo,
            Scheduler,
            SchedulerStats,
            StepPlan,
        )
    except ModuleNotFoundError as error:
        if error.name != "pyllama4._core":
            raise
        raise ModuleNotFoundError(
            f"pyllama4's compiled core is not built here ({Path(__file__).parent}): install "
            "pyllama4 first (`pip install .` in the repository root builds it)",
            name=error.name,
        ) from None

# The engine pulls in torch: import it on first use, so the core alone stays light.
_LAZY = {
    "Engine": "pyllama4.engine",
    "SamplingParams": "pyllama4.sampling_params",
    "RequestOutput": "pyllama4.outputs",
    "CompletionOutput": "pyllama4.outputs",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pyllama4' has no attribute {name!r}")


__all__ = [
    "CompletionOutput",
    "Engine",
    "RequestOutput",
    "SamplingParams",
    "Finished",
    "KVPool",
    "RadixCache",
    "RadixCacheStats",
    "RequestInfo",
    "Scheduler",
    "SchedulerStats",
    "StepPlan",
]
__version__ = "0.1.0"
