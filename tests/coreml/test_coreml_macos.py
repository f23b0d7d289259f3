"""Core ML itself (macOS 15+): the exported program run by Apple's runtime, against the NumPy reference
interpreter and PyTorch. On Linux the module is skipped; tests/coreml/test_coreml_export.py covers the
interpreter there.

Tolerances: the tiny model's logits span about +-2.3, where one fp16 step is 0.002; Core ML computes in fp16
and may accumulate in fp16 too (GPU, Neural Engine), so logits are compared at 0.05, and argmax (or greedy
text) only where the reference's top two are more than 0.1 apart: a random tiny model has near-ties, and
comparing choices there would test fp16 rounding, not the export.
"""

from __future__ import annotations

import platform
import sys

import pytest

if sys.platform != "darwin":
    pytest.skip("needs macOS 15+ with Core ML (Core ML runs on Apple platforms only)", allow_module_level=True)
if int((platform.mac_ver()[0] or "0").split(".")[0]) < 15:
    pytest.skip(f"needs macOS 15+ for Core ML states (this is {platform.mac_ver()[0]})", allow_module_level=True)

ct = pytest.importorskip("coremltools")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from smolexport_runtime.coreml import CoreMLRunner, causal_mask, load_coreml  # noqa: E402
from smolexport_runtime.generate import decode_one_token, prefill  # noqa: E402

from smolexport.coreml.export import CoreMLExportOptions, export_coreml  # noqa: E402
from smolexport.coreml.interpreter import Interpreter  # noqa: E402

pytestmark = pytest.mark.macos

ATOL = 0.05
IDS = [147, 206, 247, 273, 71, 190, 258, 85]  # teacher-forced input, picked for clear top-1 margins
PROMPTS = ["w234 w310", "w318 w65 w303", "w86 w75 w229 w200 w18", "w5 w9 w11"]
PREFILL = 3


@pytest.fixture(scope="module")
def exports(tiny_models, tmp_path_factory):
    folder, model = tiny_models["gqa_tied"]
    root = tmp_path_factory.mktemp("coreml-macos")
    for quant in ("fp16", "int4"):
        export_coreml(str(folder), root / quant, CoreMLExportOptions(quant=quant, context_length=64))
    return root, model


def package(root, quant):
    return root / quant / "model.mlpackage"


def run_cached(runner, ids, state=None):
    """Prefill the first PREFILL ids in one call, then one id per call: the logits after each position."""
    state = runner.new_state() if state is None else state
    inputs = {"input_ids": np.array([ids[:PREFILL]], np.int32), "causal_mask": causal_mask(PREFILL, PREFILL)}
    rows = [np.asarray(runner.predict(inputs, state)["logits"], np.float32).reshape(-1)]
    for n in range(PREFILL, len(ids)):
        step = {"input_ids": np.array([[ids[n]]], np.int32), "causal_mask": causal_mask(1, n + 1)}
        rows.append(np.asarray(runner.predict(step, state)["logits"], np.float32).reshape(-1))
    return np.stack(rows)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_same_choices(got, reference):
    """Same argmax at every position where the reference's choice is clear (top-2 margin > 2 * ATOL)."""
    top2 = np.sort(reference, axis=-1)[:, -2:]
    confident = top2[:, 1] - top2[:, 0] > 2 * ATOL
    assert confident.sum() >= len(reference) // 2, "the test inputs have near-ties: pick other IDS"
    np.testing.assert_array_equal(got.argmax(-1)[confident], reference.argmax(-1)[confident])


@pytest.mark.parametrize("compute_units", ["CPU_ONLY", "ALL"])
def test_coreml_cached_decode_matches_pytorch_and_the_interpreter_fp16(exports, compute_units):
    root, model = exports
    expected = torch_logits(model, IDS)[PREFILL - 1 :]
    got = run_cached(CoreMLRunner(package(root, "fp16"), compute_units=compute_units), IDS)
    interpreted = run_cached(Interpreter(package(root, "fp16")), IDS)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(got, interpreted, atol=ATOL, rtol=0)
    assert_same_choices(got, expected)


def test_coreml_reads_int4_weights_as_the_interpreter_does(exports):
    root, model = exports
    got = run_cached(CoreMLRunner(package(root, "int4")), IDS)
    interpreted = run_cached(Interpreter(package(root, "int4")), IDS)
    np.testing.assert_allclose(got, interpreted, atol=ATOL, rtol=0)  # same program, same dequantized weights
    assert_same_choices(got, interpreted)
    assert np.abs(got - torch_logits(model, IDS)[PREFILL - 1 :]).max() < 2.0  # compressed, still close


def confident_steps(model, prompt, limit=16, margin=2 * ATOL):
    """How many greedy tokens the model picks with a top-1 margin above `margin` (stops at eos)."""
    logits, cache, length = prefill(model.decoder, model.encode(prompt))
    for step in range(limit):
        top2 = np.sort(logits)[-2:]
        token = int(np.argmax(logits))
        if top2[1] - top2[0] <= margin:
            return step
        if token in model.eos_token_ids:
            return step + 1
        logits, cache, length = decode_one_token(model.decoder, token, cache, length)
    return limit


@pytest.mark.parametrize("quant", ["fp16", "int4"])
def test_load_coreml_generates_the_interpreters_greedy_text(exports, quant):
    root, _ = exports
    reference = load_coreml(root / quant, runner=Interpreter(package(root, quant)))
    steps, prompt = max((confident_steps(reference, p), p) for p in PROMPTS)
    assert steps >= 4, "every prompt's greedy continuation has near-ties: add prompts"
    expected = reference.generate(prompt, max_new_tokens=steps, greedy=True)

    model = load_coreml(root / quant)  # Core ML, compute units ALL
    assert model.decoder.providers == ["CoreMLRunner"]
    assert model.generate(prompt, max_new_tokens=steps, greedy=True) == expected
    assert model.last_stats.completion_tokens == reference.last_stats.completion_tokens
    assert model.last_stats.decode_tok_s > 0


def test_state_persists_between_predictions_and_states_are_independent(exports):
    root, model = exports
    expected = torch_logits(model, IDS)
    runner = CoreMLRunner(package(root, "fp16"))
    step = {"input_ids": np.array([[IDS[PREFILL]]], np.int32), "causal_mask": causal_mask(1, PREFILL + 1)}

    prefilled = runner.new_state()
    prompt = {"input_ids": np.array([IDS[:PREFILL]], np.int32), "causal_mask": causal_mask(PREFILL, PREFILL)}
    runner.predict(prompt, prefilled)
    # Another conversation in between, on its own state, must not disturb the first one's cache.
    other = runner.new_state()
    runner.predict({"input_ids": np.array([[9, 8, 7, 6]], np.int32), "causal_mask": causal_mask(4, 4)}, other)
    cached = np.asarray(runner.predict(step, prefilled)["logits"], np.float32).reshape(-1)
    fresh = np.asarray(runner.predict(step, runner.new_state())["logits"], np.float32).reshape(-1)

    np.testing.assert_allclose(cached, expected[PREFILL], atol=ATOL, rtol=0)  # it attended to the prompt
    assert np.abs(cached - fresh).max() > 10 * ATOL  # a zeroed cache gives something else
    assert np.abs(fresh - expected[PREFILL]).max() > 10 * ATOL
