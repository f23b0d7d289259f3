"""Built-in validation inputs: chat prompts of different kinds and a plain text for perplexity.

They are deliberately generic and were not used to tune any export setting; pass your own with
--prompts FILE (a JSON list of strings) and --text FILE.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for staying focused while studying.",
    "Translate 'Good morning, how are you?' into Spanish.",
    "What is 17 multiplied by 3? Show your reasoning.",
    "Write a Python function that returns the largest number in a list.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
]

DEFAULT_TEXT = """\
The lighthouse stood at the end of a narrow spit of land, where the river met the sea. For more than a
century its keepers had climbed the spiral stairs each evening to light the lamp, trim the wick and wind
the clockwork that turned the great lens. The work was lonely but steady. Ships coming in from the open
water watched for the beam, which swept across the waves every twelve seconds, and counted the flashes to
know which harbour lay ahead.

When the lamp was electrified, the keepers were no longer needed. The last of them, a woman named Ada
who had grown up in the cottage at the foot of the tower, packed her books and moved to the town. She
kept a notebook of the weather for forty years, recording the wind, the height of the tide and the colour
of the sky at dawn. Historians later found that her notes matched the records of the national weather
service almost exactly, and in some winters they were more complete.

Today the tower is a small museum. Visitors can climb to the gallery and look out over the estuary, where
mud flats appear at low tide and thousands of birds stop to feed on their way north in spring. A plaque
near the door explains how the lens works: hundreds of glass prisms bend the light of a single lamp into
a narrow, powerful beam that can be seen more than twenty miles away. Children are often surprised that
such a bright light comes from such a small flame, and that careful design, rather than raw power, is what
made it visible so far out at sea.
"""


def load_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        prompts = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read prompts from {path}: {exc}") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise UsageError(f"{path} must hold a non-empty JSON list of non-empty strings")
    return prompts


def load_text(path: Path | None) -> str:
    if path is None:
        return DEFAULT_TEXT
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read text from {path}: {exc}") from None
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return text
