"""Request and response bodies of the OpenAI-compatible API, as msgspec structs.

Invariant: decoding a body either yields a fully typed request whose fields are in the ranges
their msgspec.Meta constraints state (the same constraints /openapi.json publishes) or raises
msgspec.ValidationError / DecodeError, which the app turns into a 400 naming the field.
SamplingParams.validate checks the same ranges again for every request.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from pyllama4.sampling_params import MAX_N, MAX_TOP_LOGPROBS

INT32_MAX = 2**31 - 1
MAX_STOP_STRINGS = 64  # each is matched against the text after every generated token

TokenId = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
TokenIds = Annotated[list[TokenId], msgspec.Meta(min_length=1)]
# logit_bias keys: OpenAI sends token ids as strings; 9 digits keeps every key below 2^31.
TokenIdKey = Annotated[str, msgspec.Meta(pattern="^[0-9]{1,9}$")]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
TokenBudget = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
MinTokens = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
ScoreBudget = Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
Completions = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]
MinP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0, le=2.0)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_LOGPROBS)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)]


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorDetail


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None  # accepted; Llama 4 always tiles at full detail


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class FunctionCall(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    arguments: str | dict[str, Any] | None = None  # OpenAI sends a JSON string


class ToolCall(msgspec.Struct, forbid_unknown_fields=False):
    function: FunctionCall
    id: str | None = None
    type: str = "function"


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's past calls
    tool_call_id: str | None = None  # a tool result's call


class FunctionDefinition(msgspec.Struct, forbid_unknown_fields=False):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=False):
    function: FunctionDefinition
    type: str = "function"


class NamedFunction(msgspec.Struct, forbid_unknown_fields=False):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=False):
    function: NamedFunction
    type: str = "function"


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=False):
    name: str = "schema"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=False):
    type: str  # "text", "json_object" or "json_schema"
    json_schema: JsonSchemaFormat | None = None


class _SamplingFields(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """Fields chat and completions share (OpenAI's plus the SGLang/vLLM extras)."""

    model: str
    n: Completions = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: TokenBudget | None = None  # None: all the room the context leaves
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[TokenIdKey, Bias] | None = None
    user: str | None = None  # accepted, not used
    top_k: TopK | None = None  # None (here and below): the server's sampling defaults
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: MinTokens = 0
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # Structured outputs: OpenAI's response_format, SGLang's regex / ebnf / json_schema (text).
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: TokenBudget | None = None  # wins over max_tokens when both are set
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None  # "none", "auto", "required" or a function
    parallel_tool_calls: bool = True


class CompletionRequest(_SamplingFields, kw_only=True):
    # A string, one token-id list, or a batch: a list of strings or of token-id lists (the
    # server checks that a list is one of these).
    prompt: str | Annotated[list[str | TokenId | TokenIds], msgspec.Meta(min_length=1)]
    max_tokens: ScoreBudget | None = None  # 0 only with echo: score the prompt, generate nothing
    logprobs: TopLogprobs | None = None
    echo: bool = False  # the prompt's text (and logprobs) precede each choice's
    # Not supported, so refused unless they ask for what the server does anyway.
    suffix: str | None = None
    best_of: Completions | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprobEntry]


class FunctionCallOut(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None  # JSON text


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionCallOut
    type: str = "function"


class ChatResponseMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionCallOut | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None
    matched_stop: str | int | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    matched_stop: str | int | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "pyllama4"
    root: str | None = None
    max_model_len: int | None = None
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class NativeSamplingParams(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """SGLang's /generate sampling_params."""

    max_new_tokens: TokenBudget | None = None  # None: all the room the context leaves
    temperature: Temperature | None = None  # None (here and below): the sampling defaults
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty | None = None
    min_new_tokens: MinTokens = 0
    stop: Stop | None = None
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: Completions = 1
    seed: Seed | None = None
    json_schema: str | None = None  # structured outputs, as SGLang's sampling_params
    regex: str | None = None
    ebnf: str | None = None


MAX_GENERATE_BATCH = 256  # prompts x n in one /generate request
PromptIds = Annotated[list[TokenId | TokenIds], msgspec.Meta(min_length=1)]
Texts = Annotated[list[str], msgspec.Meta(min_length=1)]
Images = str | list[str | list[str]]  # per prompt in a batch: one image or a list
LogprobStart = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """SGLang's /generate body: one prompt, or a batch (text: list, input_ids: list of lists)
    whose per-prompt fields are a value for all prompts or a list with one per prompt."""

    text: str | Texts | None = None
    input_ids: PromptIds | None = None  # token ids, or a list of them (a batch)
    image_data: Images | None = None  # URLs, paths or base64, one per <|image|>
    sampling_params: NativeSamplingParams | list[NativeSamplingParams] | None = None
    stream: bool = False
    rid: str | list[str] | None = None  # meta_info.id of the output(s)
    return_logprob: bool | list[bool] = False
    logprob_start_len: LogprobStart | list[LogprobStart] = -1  # -1: the last prompt token
    top_logprobs_num: TopLogprobs | list[TopLogprobs] = 0
    return_text_in_logprobs: bool = False


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    tokens: list[TokenId]
