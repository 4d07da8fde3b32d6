"""Chat templates shipped with pyllama4, as Jinja text for `tokenizer.apply_chat_template`.

- `llama4_pythonic`: Llama 4's chat layout with Meta's pythonic tool-call format: tools are
  listed as JSON in the system turn, the model calls them as
  `[func_name1(param1=value1, ...), func_name2(...)]`, past calls render the same way and tool
  results go back as `ipython` turns. Without tools it renders exactly as transformers' built-in
  Llama 4 template. The header comment of the `.jinja` file documents every choice.
- `llama-4`: SGLang's name for Llama 4's chat layout (its `--chat-template llama-4`), served by
  `llama4_pythonic`: without tools the two render alike, and with tools SGLang's conversation
  template would leave the tools out of the prompt where `llama4_pythonic` lists them.
"""

from __future__ import annotations

from importlib import resources

BUILTIN: tuple[str, ...] = ("llama4_pythonic",)
ALIASES: dict[str, str] = {"llama-4": "llama4_pythonic"}  # SGLang's template names


def builtin_template(name: str) -> str | None:
    """The text of the built-in template `<name>.jinja` in this package (or the one an alias
    names), or None if absent."""
    name = ALIASES.get(name, name)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = resources.files(__name__).joinpath(f"{name}.jinja")
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8")
