"""SamplingParams: what a request asks of the sampler and of the stop logic.

Invariant: a constructed SamplingParams is valid (`validate()` raises ValueError naming the bad
field otherwise); defaults follow the OpenAI API (temperature 1, top_p 1) with greedy when
temperature is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pyllama4.grammar import GrammarSpec

MAX_TOP_LOGPROBS = 20
MAX_N = 128  # completions per request: more is a denial of service, not a use case
# Stop strings. OpenAI's chat and completions take "up to 4 sequences"; SGLang and vLLM set no
# limit, so /generate (and the engine) take a few more. The length cap bounds the automaton
# (StopAutomaton: about one dict per character, built per request): 16 x 1000 characters build
# in tens of milliseconds; no stop string met in practice comes near 1000 characters.
MAX_STOP_STRINGS = 16
OPENAI_MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1000


def check_stop(stop: list[str], max_count: int = MAX_STOP_STRINGS) -> None:
    """Stop strings within the limits: ValueError("stop: ...") otherwise."""
    if len(stop) > max_count:
        raise ValueError(f"stop: {len(stop)} stop strings; at most {max_count} are allowed")
    for s in stop:
        if not s:
            raise ValueError("stop: stop strings must be non-empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(
                f"stop: a stop string of {len(s)} characters; at most {MAX_STOP_CHARS} are allowed"
            )


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; they share the prompt's KV through the radix cache
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    min_p: float = 0.0
    frequency_penalty: float = 0.0  # OpenAI: subtract penalty * count of the token in the output
    presence_penalty: float = 0.0  # OpenAI: subtract penalty if the token is in the output
    repetition_penalty: float = 1.0  # HF/CTRL: divide positive logits (multiply negative) of
    # tokens seen in the prompt or the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    seed: int | None = None  # same seed + same prompt = same tokens, whatever the batch
    max_tokens: int = 256
    min_tokens: int = 0  # stop tokens are masked until this many tokens are generated
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings, matched on detokenized text
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob + k top ones
    # None: none; k >= 0: each prompt token's logprob from prompt_logprobs_start on + k top ones
    prompt_logprobs: int | None = None
    prompt_logprobs_start: int = 0  # first prompt position scored (below the prompt length)
    grammar: GrammarSpec | None = None  # structured output: JSON schema, regex or EBNF

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}")

        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be in [1, {MAX_N}]")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (no limit) or >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "must be in (0, 2]")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise bad("logit_bias", f"token id {token!r} must be a non-negative integer")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", f"bias {bias} for token {token} must be in [-100, 100]")
        if self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", "must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("prompt_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs_start < 0:
            raise bad("prompt_logprobs_start", "must be >= 0")
        check_stop(self.stop)
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "token ids must be >= 0")
