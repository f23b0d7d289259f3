"""Provider resolution, and the whole runtime end to end through onnxruntime on a real (tiny) ONNX graph."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from smolexport_runtime import ContextLengthError, ManifestError, SmolexportRuntimeError, load, resolve_providers
from smolexport_runtime.generate import position_ids_from_mask

from .conftest import ERROR_TOKEN, IM_END, VOCAB_SIZE, make_export

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def test_auto_prefers_cuda_when_available():
    assert resolve_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers("auto", [CPU]) == [CPU]


def test_short_and_full_names():
    assert resolve_providers("cpu", [CPU]) == [CPU]
    assert resolve_providers(["CUDA", "cpu", "cpu"], [CUDA, CPU]) == [CUDA, CPU]
    assert resolve_providers([CPU], [CPU]) == [CPU]


def test_unavailable_provider_lists_the_available_ones():
    expected = r"'cuda' is not available .*available: AzureExecutionProvider, CPUExecutionProvider"
    with pytest.raises(SmolexportRuntimeError, match=expected):
        resolve_providers(["cuda"], ["AzureExecutionProvider", CPU])
    with pytest.raises(SmolexportRuntimeError, match="'tpu' is not available"):
        resolve_providers("tpu", [CPU])
    with pytest.raises(SmolexportRuntimeError, match="empty"):
        resolve_providers([], [CPU])


@pytest.fixture(scope="module")
def model(export_dir):
    return load(export_dir, providers=["cpu"], threads=1)


def test_chat_stream_end_to_end(model):
    # The chat prompt ends with "assistant\n"; the graph's table then spells "Paris" and ends the turn.
    pieces = list(model.stream("What is the capital of France?"))
    assert pieces == list("Paris")
    stats = model.last_stats
    assert stats.finish_reason == "stop" and stats.completion_tokens == 6  # "Paris" + <|im_end|>
    assert stats.prompt_tokens == len(model.encode("What is the capital of France?"))
    assert model.eos_token_ids == {256, IM_END}  # generation_config + tokenizer_config's eos_token
    assert model.decoder.providers == [CPU]


def test_raw_text_stop_strings_and_sampling(model):
    assert model.generate("x\n", chat=False) == "Paris"  # no "#": mask, positions and cache were consistent
    assert model.generate("x\n", chat=False, stop=["ri"]) == "Pa"
    assert model.generate("x\n", chat=False, max_new_tokens=2) == "Pa"
    sampled = [model.generate("\n", chat=False, temperature=0.7, top_p=0.9, seed=0) for _ in range(2)]
    assert sampled[0] == sampled[1] == "Paris"


def test_context_length_from_the_manifest(model):
    assert model.context_length == 256
    with pytest.raises(ContextLengthError, match="300 tokens"):
        model.stream("y" * 300, chat=False)


def test_low_level_forward_with_left_padding(model):
    decoder = model.decoder
    past = decoder.empty_cache(2)
    assert len(past) == 4 and past[0].shape == (2, 2, 0, 4) and past[0].dtype == np.float32
    input_ids = np.array([[0, ord("a")], [ord("P"), ord("a")]], dtype=np.int64)
    mask = np.array([[0, 1], [1, 1]], dtype=np.int64)
    logits, cache = decoder.forward(input_ids, mask, position_ids_from_mask(mask, 2), past)
    assert logits.shape == (2, 2, VOCAB_SIZE) and logits.dtype == np.float32
    assert [p.shape() for p in cache] == [[2, 2, 2, 4]] * 4
    assert list(np.argmax(logits[:, -1], axis=-1)) == [ord("r"), ord("r")]
    # One decode step on top of the padded batch.
    mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    step = np.array([[ord("r")], [ord("r")]], dtype=np.int64)
    logits, grown = decoder.forward(step, mask, position_ids_from_mask(mask, 1), cache)
    assert list(np.argmax(logits[:, -1], axis=-1)) == [ord("i"), ord("i")]
    assert grown[0].shape() == [2, 2, 3, 4]
    # The graph's self-check is live: row 0 has one padding slot, so its position must be 1, not 2.
    logits, _ = decoder.forward(step, mask, np.array([[2], [2]], dtype=np.int64), cache)
    assert np.argmax(logits[0, -1]) == ERROR_TOKEN


def test_float16_cache(tmp_path):
    model = load(make_export(tmp_path / "fp16", kv_dtype="float16"), providers="cpu")
    assert model.decoder.empty_cache(1)[0].dtype == np.float16
    assert model.generate("Hi") == "Paris"


def test_folder_without_chat_template_uses_raw_text(tmp_path):
    model = load(make_export(tmp_path / "raw", chat_template=False), providers="auto")
    assert model.chat_template is None
    assert model.generate("\n") == "Paris"


def test_damaged_export_fails_at_load(tmp_path, export_dir):
    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    with open(folder / "model.onnx.data", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match=r"model\.onnx\.data sha256 mismatch"):
        load(folder)


def test_a_damaged_graph_file_is_reported_as_damage_not_as_an_onnxruntime_error(tmp_path, export_dir):
    """The checksums run beside the session's creation: when onnxruntime fails on a truncated model.onnx, the
    checksum's verdict is what the user sees."""
    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    graph = folder / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:200])
    with pytest.raises(ManifestError, match=r"model\.onnx size mismatch"):
        load(folder)


def test_graph_that_does_not_match_its_manifest(tmp_path):
    # The manifest claims float16 caches but the graph takes float32 ones.
    kv_cache = {"layout": "batch,kv_heads,seq,head_dim", "dtype": "float16"}
    folder = make_export(tmp_path / "bad", kv_dtype="float32", kv_cache=kv_cache)
    with pytest.raises(SmolexportRuntimeError, match="tensor\\(float\\) but the manifest says float16"):
        load(folder)


def test_importing_the_runtime_does_not_import_torch_or_transformers():
    code = (
        "import sys, smolexport_runtime\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
