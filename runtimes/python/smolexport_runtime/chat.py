"""Chat templates rendered exactly as Hugging Face transformers renders them.

Models are trained on the text their template produces, so the environment (sandbox, whitespace control,
`tojson`, `raise_exception`, `strftime_now`) copies transformers' `apply_chat_template` setup: a template
that works there renders the same string here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError, RequestError

TEMPLATE_FILE = "chat_template.jinja"
# The special-token variables transformers passes to every template (its `special_tokens_map`).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)

Message = Mapping[str, Any]


def raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected the messages: {message}")


def strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # jinja2's own tojson HTML-escapes `<`, `>` and `&`, which would corrupt tool schemas in the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def special_token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as plain strings or as AddedToken dicts with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass
class ChatTemplate:
    source: str
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = "chat template"

    @cached_property
    def _compiled(self) -> jinja2.Template:
        try:
            return make_environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{self.origin} is not a valid Jinja template: {exc}") from None

    def render(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        """The prompt text for `messages`; extra `variables` (e.g. tools) are passed to the template."""
        _check_messages(messages)
        context = {**self.special_tokens, **variables}
        try:
            return self._compiled.render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.origin} failed to render: {exc}") from None


def load_chat_template(folder: str | Path, tokenizer_config: Mapping[str, Any]) -> ChatTemplate | None:
    """`chat_template.jinja` if present, else `tokenizer_config.json["chat_template"]`, else None."""
    folder = Path(folder)
    special = {
        k: t for k in SPECIAL_TOKEN_KEYS if (t := special_token_text(tokenizer_config.get(k))) is not None
    }
    path = folder / TEMPLATE_FILE
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ChatTemplateError(f"{path} is not UTF-8 text. Re-export the model.") from None
        return ChatTemplate(source, special, origin=str(path))
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        # Older configs may hold several named templates; transformers uses the one named "default".
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    if isinstance(source, str) and source:
        return ChatTemplate(source, special, origin=f"{folder / 'tokenizer_config.json'} chat_template")
    return None


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ChatTemplateError(f"messages[{i}] must be a dict with a 'role' key, got {_short(message)}")
        if not isinstance(message["role"], str):
            raise ChatTemplateError(f"messages[{i}]['role'] must be a string, got {_short(message['role'])}")
        # A template renders None or a number as the text "None" / "42": a caller's mistake, never meant.
        if not isinstance(message.get("content"), str):
            raise ChatTemplateError(
                f"messages[{i}]['content'] must be a string, got {_short(message.get('content'))}"
            )
        check_text(message["content"], f"messages[{i}]['content']")
        check_text(message["role"], f"messages[{i}]['role']")


def check_text(text: str, what: str) -> None:
    """Refuses text that is not valid Unicode (a lone surrogate, e.g. from a non-UTF-8 command-line argument
    or a JSON "\\ud800" escape): the tokenizer cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{what} is not valid text: character {exc.start} is an unpaired surrogate {text[exc.start]!r} "
            "(undecodable input?)"
        ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
