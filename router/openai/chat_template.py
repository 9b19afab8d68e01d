"""Chat messages -> prompt text, through the model's chat template.

Upstream: `serving.py` hands the messages of a chat request (already flattened to text by
`protocol.ChatMessage.to_template`). Downstream: the prompt goes through the native
`Validator` with `add_special_tokens=False`, since the template writes the special tokens.
The template is the `--chat-template` file or the tokenizer's own (`tokenizer_config.json`
or `chat_template.jinja`); transformers renders it in a sandboxed Jinja environment.
"""

import json
from pathlib import Path
from typing import Any


class ChatTemplateError(ValueError):
    """The request cannot be templated; the message is for the client (HTTP 400)."""


def read_chat_template(value: str | None) -> str | None:
    """The `--chat-template` override: a file's text, or the value itself if it is a template.
    A JSON file is a tokenizer config (TGI's `--tokenizer-config-path`): its `chat_template`,
    or None (the tokenizer's own) when it has none."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file() and path.suffix == ".json":
        return _template_of(json.loads(path.read_text()), value)
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"--chat-template {value!r}: no such file")


def _template_of(config: dict[str, Any], source: str) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates, as transformers saves several
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{source}: `chat_template` is neither a template nor a list of them")
    return template


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], template: str | None) -> str:
    """The prompt for `messages`, ending with the assistant's turn header."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "this model has no chat template, so /v1/chat/completions cannot build a prompt: "
            "use /v1/completions, or restart the server with `--chat-template FILE`")
    try:
        prompt = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 -- any failure comes from the messages or template
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
    if not isinstance(prompt, str):
        raise ChatTemplateError("the chat template did not render to text")
    return prompt
