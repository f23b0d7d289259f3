"""How `smolexport validate` runs a Core ML export: Core ML itself on macOS, the NumPy interpreter elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from smolexport_runtime.coreml import CoreMLRunner, load_coreml

from .interpreter import Interpreter


def load_coreml_for_validation(export_dir: Path, backend: str = "auto"):
    """Returns (runtime Model, manifest view with .quant/.source/.model) for an export folder."""
    raw = json.loads((Path(export_dir) / "smolexport.json").read_text())
    package = Path(export_dir) / raw["package"]
    use_coreml = backend == "coreml" or (backend == "auto" and sys.platform == "darwin")
    runner = CoreMLRunner(package) if use_coreml else Interpreter(package)
    model = load_coreml(export_dir, runner=runner)
    manifest = SimpleNamespace(quant=raw["quant"], source=raw["source"], model=SimpleNamespace(**raw["model"]))
    return model, manifest
