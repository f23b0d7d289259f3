"""The public entry point: `load(folder)` gives a Model that turns prompts or chat messages into text."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from .chat import ChatTemplate, Message, load_chat_template
from .errors import ChatTemplateError
from .generate import Decoder, GenerationStats, stream_generate
from .manifest import Manifest, load_manifest
from .sampling import SamplingConfig, make_sampler
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

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, **variables: Any
    ) -> str:
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template (no chat_template.jinja, none in tokenizer_config.json); "
                "pass chat=False to use the prompt as raw text"
            )
        return self.chat_template.render(messages, add_generation_prompt, **variables)

    def encode(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Prompt token ids. chat=None means chat when the model has a template; a str is one user message."""
        if chat is None:
            chat = self.chat_template is not None or not isinstance(prompt, str)
        if chat:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            # The rendered template already holds BOS and the other special tokens: adding them again
            # would double them.
            return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False).ids
        if not isinstance(prompt, str):
            raise ChatTemplateError("a list of messages needs chat=True; with chat=False pass a string")
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def stream(
        self,
        prompt: Prompt,
        *,
        chat: bool | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        greedy: bool = False,
        stop: str | Sequence[str] | None = None,
    ) -> Iterator[str]:
        """Yields the completion piece by piece. Greedy unless temperature > 0; stats land in `last_stats`."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, greedy=greedy)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        self.last_stats = GenerationStats()
        return stream_generate(
            self.decoder,
            self.tokenizer,
            self.encode(prompt, chat),
            make_sampler(sampling),
            max_new_tokens=max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            stop=stops,
            context_length=self.context_length,
            stats=self.last_stats,
        )

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The whole completion as one string; takes the same keyword arguments as `stream`."""
        return "".join(self.stream(prompt, **kwargs))


def load(
    path: str | Path,
    providers: str | Sequence[str] = "auto",
    threads: int | None = None,
    verify: bool = True,
) -> Model:
    """Loads an export folder. `verify` checks every file's sha256 first (seconds for GB-sized weights)."""
    folder = Path(path)
    manifest = load_manifest(folder, verify=verify)
    decoder = OnnxDecoder(folder / "model.onnx", manifest, providers=providers, threads=threads)
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
