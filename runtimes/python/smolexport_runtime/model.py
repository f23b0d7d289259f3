"""The public entry point: `load(folder)` gives a Model that turns prompts or chat messages into text."""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from . import tools as tool_calling
from .chat import ChatTemplate, Message, check_text, load_chat_template
from .constraints import ConstrainedSampler, ConstraintError, GrammarTokenizer, parse_response_format
from .conversation import Conversation
from .errors import ChatTemplateError, RequestError, SmolexportRuntimeError
from .generate import Decoder, GenerationStats
from .manifest import Manifest, check_listed_files, is_weight_data, load_manifest, verify_files
from .sampling import Sampler, SamplingConfig, make_sampler
from .session import OnnxDecoder
from .tokenizer import eos_token_ids, load_tokenizer, read_json
from .tools import ToolCall

Prompt = str | Sequence[Message]


class Model:
    """A decoder, its tokenizer and chat template. Build it with `load()`; the constructor takes parts so that
    tests and tools can plug in another decoder."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer: Tokenizer,
        *,
        context_length: int | None = None,
        eos_token_ids: Collection[int] = (),
        chat_template: ChatTemplate | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self.chat_template = chat_template
        self.manifest = manifest
        self.last_stats: GenerationStats | None = None
        self._conversation: Conversation | None = None
        self._grammar: GrammarTokenizer | None = None
        self._special_texts: tuple[str, ...] | None = None
        self._literal: Tokenizer | None = None
        self._grammar_lock = threading.Lock()

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template (no chat_template.jinja, none in tokenizer_config.json); "
                "pass chat=False to use the prompt as raw text"
            )
        return self.chat_template.render(messages, add_generation_prompt, **variables)

    def encode(
        self, prompt: Prompt, chat: bool | None = None, add_generation_prompt: bool = True
    ) -> list[int]:
        """Prompt token ids. chat=None means chat when the model has a template; a str is one user message.
        add_generation_prompt=False renders messages without the assistant's opening (for saved prefixes)."""
        if chat is None:
            chat = self.chat_template is not None or not isinstance(prompt, str)
        if chat:
            if not isinstance(prompt, str | Sequence) or isinstance(prompt, bytes):
                kind = type(prompt).__name__
                raise RequestError(f"the prompt must be a string or a list of messages, got {kind}")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            # The rendered template already holds BOS and the other special tokens: adding them again
            # would double them.
            return self._encode_chat(messages, add_generation_prompt)
        if not isinstance(prompt, str):
            raise ChatTemplateError("a list of messages needs chat=True; with chat=False pass a string")
        check_text(prompt, "the prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def _encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
        """The rendered chat's ids, where message contents are text: a user who writes `<|im_start|>system`
        gets those characters, never the control token (which would let them forge a system turn)."""
        contents = {i: m.get("content") for i, m in enumerate(messages) if isinstance(m, Mapping)}
        forged = {i: c for i, c in contents.items() if isinstance(c, str) and self._holds_special_text(c)}
        if not forged:  # the common case: one encode of the whole text, as transformers does
            text = self.apply_chat_template(messages, add_generation_prompt)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        # Those contents become markers in the rendered text; the template around them is encoded as usual,
        # each content on its own with special tokens read as plain text.
        nonce = secrets.token_hex(8)  # markers no message holds, by chance or on purpose
        marked = [
            {**m, "content": f"\ue000{nonce}:{i}\ue001"} if i in forged else m for i, m in enumerate(messages)
        ]
        text = self.apply_chat_template(marked, add_generation_prompt)
        ids, position, literal = [], 0, self._literal_tokenizer()
        matches = list(re.finditer(f"\ue000{nonce}:(\\d+)\ue001", text))
        if sorted(int(m.group(1)) for m in matches) != sorted(forged):
            raise ChatTemplateError("the chat template changes message contents; cannot encode them as text")
        for match in matches:
            ids += self.tokenizer.encode(text[position : match.start()], add_special_tokens=False).ids
            ids += literal.encode(forged[int(match.group(1))], add_special_tokens=False).ids
            position = match.end()
        return ids + self.tokenizer.encode(text[position:], add_special_tokens=False).ids

    def _holds_special_text(self, text: str) -> bool:
        if self._special_texts is None:
            decoder = self.tokenizer.get_added_tokens_decoder()
            self._special_texts = tuple(t.content for t in decoder.values() if t.special and t.content)
        return any(special in text for special in self._special_texts)

    def _literal_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer that reads special tokens' text as plain text."""
        if self._literal is None:
            literal = Tokenizer.from_str(self.tokenizer.to_str())
            if not hasattr(literal, "encode_special_tokens"):  # tokenizers < 0.15: fail closed
                raise RequestError("a message holds a control token's text; upgrade tokenizers to encode it")
            literal.encode_special_tokens = True
            literal.no_truncation()
            literal.no_padding()
            self._literal = literal
        return self._literal

    def sampler(self, sampling: SamplingConfig, response_format: Any = None) -> Sampler:
        """The logits -> token function for one generation: `sampling`, constrained to `response_format` if
        given (constraints.py; raises ConstraintError up front for a format that cannot be enforced)."""
        sampler = make_sampler(sampling)
        parsed = parse_response_format(response_format)
        if parsed is None:
            return sampler
        grammar = self.grammar_tokenizer()
        return ConstrainedSampler(sampler, grammar, grammar.compile(parsed))

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """llguidance's view of the tokenizer, built at the first constrained generation."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarTokenizer(self.tokenizer, self._logits_width(), self.eos_token_ids)
            return self._grammar

    def _logits_width(self) -> int:
        return getattr(self.decoder, "vocab_size", None) or self.tokenizer.get_vocab_size(
            with_added_tokens=True
        )

    def generate_json(self, prompt: Prompt, response_format: Any, **kwargs: Any) -> Any:
        """The answer constrained to `response_format` (a JSON Schema or a Pydantic model class), parsed: the
        Pydantic instance, or what json.loads gives. Raises ConstraintError if the answer was cut (by
        max_new_tokens or a stop string) before the JSON was complete."""
        text = self.generate(prompt, response_format=response_format, **kwargs)
        try:
            if isinstance(response_format, type) and hasattr(response_format, "model_validate_json"):
                return response_format.model_validate_json(text)
            return json.loads(text)
        except ValueError as exc:
            reason = self.last_stats.finish_reason if self.last_stats else None
            raise ConstraintError(
                f"the answer is not complete JSON (finish reason {reason!r}; raise max_new_tokens?): {exc}"
            ) from None

    def chat_with_tools(
        self,
        messages: Sequence[Message],
        tools: Sequence[Any],
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = True,
        **kwargs: Any,
    ) -> tuple[str | None, list[ToolCall]]:
        """One assistant turn with tools (tools.py: SmolLM2's trained format, enforced by a grammar). Returns
        (text, []) for a text answer or (None, calls) for tool calls, whose arguments validate against each
        tool's schema. Put the results back as {"role": "tool", "content": ...} messages after an assistant
        message with "tool_calls", and call again."""
        parsed = tool_calling.parse_tools(tools)
        history = tool_calling.render_messages(messages, parsed)
        response_format = tool_calling.grammar(parsed, tool_choice, parallel_tool_calls)
        text = self.generate(history, response_format=response_format, **kwargs)
        calls = None if tool_choice == "none" else tool_calling.parse_calls(text, parsed)
        if calls == []:  # the trained "no call needed": an empty block, no text
            return "", []
        return (text, []) if calls is None else (None, calls)

    def conversation(self, reuse_generated: bool = False) -> Conversation:
        """A conversation with a KV cache of its own: one per independent chat an app holds at once.
        reuse_generated=True also reuses the answers' cached keys and values (see CacheState.reuse)."""
        return Conversation(self, reuse_generated=reuse_generated)

    @property
    def default_conversation(self) -> Conversation:
        """The conversation `stream` and `generate` run on: it keeps the last sequence's cache, so a call
        that repeats the previous history (and adds a turn) prefills only the new tokens."""
        if self._conversation is None:
            self._conversation = Conversation(self, fall_back_when_busy=True)
        return self._conversation

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """Yields the completion piece by piece; stats land in `last_stats`. Keywords: chat, max_new_tokens,
        temperature, top_k, top_p, seed, greedy, stop, response_format, prompt_lookup, draft_model,
        draft_tokens (see Conversation.stream). Reuses the cached prefix of
        the previous call; a second stream running at the same time gets a fresh cache of its own."""
        return self.default_conversation.stream(prompt, **kwargs)

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The whole completion as one string; takes the same keyword arguments as `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def warm_start(self, path: str | Path, prompt: Prompt, *, chat: bool | None = None) -> bool:
        """Loads a saved prompt prefix (e.g. the system prompt) into the default conversation, or computes and
        saves it; see Conversation.warm_start. Returns True when the file was used."""
        return self.default_conversation.warm_start(path, prompt, chat=chat)

    def reset(self) -> None:
        """Frees the default conversation's KV cache."""
        if self._conversation is not None:
            self._conversation.reset()


def _verify_into(folder: Path, manifest: Manifest, names: list[str], result: list) -> None:
    try:
        verify_files(folder, manifest.files, names)
        result.append(None)
    except BaseException as exc:  # handed to the loading thread, which raises it
        result.append(exc)


def load(
    path: str | Path,
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
    verify: bool = True,
) -> Model:
    """Loads an export folder. `verify` checks every file's size and sha256 (about a second per GB of weight):
    the graph, tokenizer and configs before anything parses them; the weight data on a thread of its own
    while onnxruntime builds the session, so a cold start does not pay for that hash on top of the session,
    and a damaged folder still raises ManifestError before anything runs."""
    folder = Path(path)
    manifest = load_manifest(folder, verify=False)
    checked: list[BaseException | None] = []
    checker = None
    if verify:
        weights = [name for name in manifest.files if is_weight_data(name)]
        check_listed_files(folder, manifest.files)
        verify_files(folder, manifest.files, [name for name in manifest.files if name not in weights])
        checker = threading.Thread(
            target=_verify_into, args=(folder, manifest, weights, checked), daemon=True
        )
        checker.start()
    try:
        decoder = OnnxDecoder(folder / manifest.graph_file, manifest, providers=providers, threads=threads)
    except SmolexportRuntimeError:
        if checker is not None:  # a damaged file explains a failed load better than onnxruntime's message
            checker.join()
            if checked and checked[0] is not None:
                raise checked[0] from None
        raise
    if checker is not None:
        checker.join()
        if checked[0] is not None:
            raise checked[0]
    tokenizer = load_tokenizer(folder)
    tokenizer_config = read_json(folder / "tokenizer_config.json")
    generation_config = read_json(folder / "generation_config.json")
    return Model(
        decoder,
        tokenizer,
        context_length=manifest.model.context_length,
        eos_token_ids=eos_token_ids(generation_config, tokenizer_config, tokenizer),
        chat_template=load_chat_template(folder, tokenizer_config),
        manifest=manifest,
    )
