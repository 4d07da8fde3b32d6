"""The engine, one room per concern:

- loop: Engine, the requests' way in and out (submit, abort, stats, generate) and the
  delivery of each step's outputs on the event loop;
- steps: the step loop on the model thread (schedule → launch → commit, then hand over);
- output: a committed step's tokens → text, stop decisions, outputs (never the scheduler);
- executor: running a planned step on the model thread (plain, or EAGLE3);
- build: an engine's parts from an EngineConfig (tensor-parallel bootstrap, KV budget);
- intake: what a request must satisfy before it is queued;
- offline: a batch run to completion (Engine.generate);
- config: EngineConfig, and the dtype a model runs in by default;
- records: what the engine keeps per request.

What lies above (the server, training) imports only this package's names below.
"""

from pyllama4.engine.build import spawn_node_ranks
from pyllama4.engine.config import EngineConfig, auto_dtype
from pyllama4.engine.loop import Engine
from pyllama4.speculative.eagle import SpecConfig

__all__ = ["Engine", "EngineConfig", "SpecConfig", "auto_dtype", "spawn_node_ranks"]
