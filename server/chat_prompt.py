"""A chat request's messages as prompt token ids, through the chat template.

Invariant: each image part becomes one {"type": "image"} template part (one <|image|>) and one
source, in message order; text-only content stays a string, so templates without image support
take it; a message or template error is a 400 on "messages". Templating and tokenizing run in
worker threads (both grow with the messages).
"""

from __future__ import annotations

from typing import Any

import anyio

from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError
from pyllama4.server.serving import Serving
from pyllama4.server.tools import ToolPlan, template_message

CHAT_ROLES = ("system", "user", "assistant", "tool", "ipython", "developer")


async def render_chat(
    serving: Serving, req: p.ChatCompletionRequest, tools: ToolPlan
) -> tuple[list[int], list[str]]:
    """The prompt's token ids (one <|image|> per image) and the images' sources, in order."""
    text, sources = await anyio.to_thread.run_sync(chat_text, serving, req, tools)
    return await serving.text.encode(text, "messages", add_special_tokens=False), sources


def chat_text(
    serving: Serving, req: p.ChatCompletionRequest, tools: ToolPlan
) -> tuple[str, list[str]]:
    """The templated prompt text and the images' sources, in order."""
    if not req.messages:
        raise HTTPError(400, "messages must not be empty", param="messages")
    messages = []
    sources: list[str] = []
    for i, m in enumerate(req.messages):
        if m.role not in CHAT_ROLES:
            raise HTTPError(
                400, f"messages[{i}].role {m.role!r} is not a chat role", param="messages"
            )
        content: str | list[dict[str, str]] = m.content or ""
        if isinstance(m.content, list):
            content = message_parts(serving, i, m.content, sources)
        messages.append(template_message(i, m, content))
    # The template copies each message's text into the prompt: refused before it is rendered.
    serving.text.check_size(sum(map(_text_length, messages)), "messages")
    try:
        text = serving.engine.tokenizer.apply_chat_template(
            messages,
            tools=tools.template_tools,
            chat_template=serving.chat_template,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            continue_final_message=req.continue_final_message,
            tokenize=False,
            **(req.chat_template_kwargs or {}),
        )
    except Exception as e:  # noqa: BLE001 - a template error is the request's problem
        raise HTTPError(
            400, f"the chat template failed on these messages: {e}", param="messages"
        ) from None
    return text, sources


def _text_length(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    return sum(len(part.get("text", "")) for part in content or [] if isinstance(part, dict))


def message_parts(
    serving: Serving, i: int, parts: list[p.ContentPart], sources: list[str]
) -> str | list[dict[str, Any]]:
    """Message i's content parts as the template takes them; image sources go to `sources`."""
    out: list[dict[str, str]] = []
    for part in parts:
        if part.type == "text" and part.text is not None:
            out.append({"type": "text", "text": part.text})
        elif part.type == "image_url" and part.image_url is not None:
            serving.check_takes_images("messages")
            out.append({"type": "image"})
            sources.append(part.image_url.url)
        else:
            raise HTTPError(
                400,
                f"messages[{i}]: content part of type {part.type!r} needs its field",
                param="messages",
            )
    if any(part["type"] == "image" for part in out):
        return out
    return "".join(part["text"] for part in out)
