"""Click options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click


def speculation_options(scope: str) -> Callable:
    """--prompt-lookup, --draft-model and --draft-tokens (speculative decoding; the runtime's speculation.py).
    `scope` says when they apply, e.g. "Greedy only"."""
    options = [
        click.option(
            "--prompt-lookup",
            type=click.IntRange(0, 64),
            default=0,
            show_default=True,
            metavar="N",
            help=f"{scope}: check up to N tokens copied from the text per step (faster on answers that quote or "
            "rewrite their input; the same text on float exports).",
        ),
        click.option(
            "--draft-model",
            type=click.Path(path_type=Path),
            default=None,
            help=f"{scope}: an export of a smaller model with the same tokenizer (SmolLM2-135M for the 1.7B) that "
            "drafts --draft-tokens tokens the model checks in one step (the same text on float exports).",
        ),
        click.option(
            "--draft-tokens",
            type=click.IntRange(1, 64),
            default=3,
            show_default=True,
            metavar="N",
            # 2-3 won at 1.7B shapes for acceptance 0.8-0.9 (benchmarks/README.md, "Verification cost").
            help="Tokens the --draft-model drafts per step.",
        ),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
