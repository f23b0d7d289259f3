"""The public entry point: `load(folder)` gives a Model that turns prompts or chat messages into text."""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .chat import ChatTemplate, Message, check_text, load_chat_template
from .conversation import Conversation
from .errors import ChatTemplateError, RequestError, SmolexportRuntimeError
from .generate import Decoder, GenerationStats
from .manifest import Manifest, check_listed_files, is_weight_data, load_manifest, verify_files
from .session import OnnxDecoder
from .tokenizer import eos_token_ids, load_tokenizer, read_json

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
            text = self.apply_chat_template(messages, add_generation_prompt)
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        if not isinstance(prompt, str):
            raise ChatTemplateError("a list of messages needs chat=True; with chat=False pass a string")
        check_text(prompt, "the prompt")
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

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
        temperature, top_k, top_p, seed, greedy, stop (see Conversation.stream). Reuses the cached prefix of
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
