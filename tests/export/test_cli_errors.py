"""User errors: one clear line on stderr, a non-zero exit code, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from smolexport.cli import main
from smolexport.onnx.export import OnnxExportOptions, export_onnx


def run_cli(*args, **env):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env or None)
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny_export(tiny_models, tmp_path_factory):
    folder, _ = tiny_models["gqa_tied"]
    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    export_onnx(str(folder), out, OnnxExportOptions(quant="fp32", context_length=64))
    return out


def test_missing_model_path(tmp_path):
    result = run_cli("onnx", "--model", tmp_path / "nope", "--output", tmp_path / "out", "-q")
    assert_one_line_error(result, 1, "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_non_llama_config(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    result = run_cli("onnx", "--model", folder, "--output", tmp_path / "out", "-q")
    assert_one_line_error(result, 1, "unsupported architecture GPT2LMHeadModel", "Llama")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    result = run_cli("onnx", "--model", bad, "--output", tmp_path / "out", "-q")
    assert_one_line_error(result, 1, "corrupt or unsupported GGUF file")
    assert not (tmp_path / "out").exists()


def test_pickle_only_folder_is_refused(tiny_models, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["gqa_tied"][0], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    result = run_cli("onnx", "--model", folder, "--output", tmp_path / "out", "-q")
    assert_one_line_error(result, 1, "no .safetensors weights", "pickle")


def test_hub_id_offline_without_cache(tmp_path):
    result = run_cli(
        "onnx",
        "--model",
        "SomeOrg/not-a-real-model-xyz",
        "--output",
        tmp_path / "out",
        "-q",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    assert_one_line_error(result, 1, "could not get SomeOrg/not-a-real-model-xyz from the Hugging Face Hub")


def test_unknown_quant_is_a_usage_error(tiny_models, tmp_path):
    result = CliRunner().invoke(
        main, ["onnx", "--model", str(tiny_models["gqa_tied"][0]), "--quant", "int3", "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "int3" in result.output


def test_block_size_and_scale_flags_reach_the_export(tiny_models, tmp_path):
    args = ["onnx", "--model", tiny_models["gqa_tied"][0], "--block-size", "16", "--scales", "log8", "-q"]
    result = run_cli(*args, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    quant = json.loads((tmp_path / "out" / "smolexport.json").read_text())["quant"]
    assert quant["block_size"] == 16 and quant["scales"] == "log8" and quant["mode"] == "int4"
    result = run_cli(*args[:-3], "--scales", "log4", "--output", tmp_path / "bad")
    assert result.exit_code == 2 and "log4" in result.output


def test_int8_vocab_flag_reaches_the_export_and_is_int4_only(tiny_models, tmp_path):
    args = ["onnx", "--model", tiny_models["gqa_tied"][0], "--preset", "rtn", "--int8-vocab", "100", "-q"]
    result = run_cli(*args, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    quant = json.loads((tmp_path / "out" / "smolexport.json").read_text())["quant"]
    assert quant["int8_vocab"] == 100 and quant["int8_matrices"] == {"embed_tokens.int8_rows": 64}
    result = run_cli(*args, "--quant", "int8", "--output", tmp_path / "int8")
    assert_one_line_error(result, 2, "--int8-vocab applies to --quant int4 only")


def test_existing_output_is_refused_without_force(tiny_models, tiny_export, tmp_path):
    before = sorted(p.name for p in tiny_export.iterdir())
    result = run_cli("onnx", "--model", tiny_models["gqa_tied"][0], "--output", tiny_export, "-q")
    assert_one_line_error(result, 1, "already exists", "--force")
    assert sorted(p.name for p in tiny_export.iterdir()) == before


def test_failed_export_leaves_nothing_behind(tiny_models, tmp_path, monkeypatch):
    import smolexport.onnx.export as export_module

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "build_decoder", explode)
    with pytest.raises(RuntimeError):
        export_onnx(str(tiny_models["gqa_tied"][0]), tmp_path / "out", OnnxExportOptions(quant="int4"))
    assert list(tmp_path.iterdir()) == []  # no output and no staging folder


@pytest.mark.skipif(sys.platform == "win32", reason="the staging lock is POSIX flock")
def test_a_killed_exports_staging_folder_is_removed_by_the_next_one_never_a_running_ones(tiny_models, tmp_path):
    """kill -9 leaves a staging folder behind; a later export into the same folder removes it and says so,
    while a staging folder whose export still runs (its lock held) is left alone."""
    import signal
    import subprocess

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from smolexport.packaging import staged_output\n"
         "with staged_output(Path(sys.argv[1]), False) as s:\n"
         "    (s / 'model.onnx').write_bytes(b'half')\n    print(s, flush=True)\n    time.sleep(120)\n",
         str(tmp_path / "killed")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed = Path(child.stdout.readline().strip())
    assert killed.is_dir() and killed.name.startswith(".killed.partial-")
    try:
        # While that export runs, another export does not touch its staging folder.
        export_onnx(str(tiny_models["gqa_tied"][0]), tmp_path / "first", OnnxExportOptions(quant="fp32"))
        assert killed.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert killed.is_dir()  # kill -9: nothing ran to remove it
    result = run_cli("onnx", "--model", tiny_models["gqa_tied"][0], "--quant", "fp32", "--output", tmp_path / "second")
    assert result.exit_code == 0, result.output
    assert not killed.exists() and f"removed {killed}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "second"]  # no lock files left either


@pytest.mark.parametrize("damage", ["missing", "altered"])
def test_damaged_export_is_reported_by_file(tiny_export, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    if damage == "missing":
        (copy / "tokenizer.json").unlink()
    else:
        with open(copy / "onnx" / "model.onnx_data", "r+b") as f:
            f.seek(100)
            f.write(b"\x13\x37")
    result = run_cli("run", copy, "hello", "--max-new-tokens", "2")
    assert result.exit_code == 1
    assert ("tokenizer.json" if damage == "missing" else "onnx/model.onnx_data") in result.output


def test_not_an_export_folder(tmp_path):
    result = run_cli("run", tmp_path, "hello")
    assert result.exit_code == 1 and "smolexport.json" in result.output


def test_prompt_over_the_context(tiny_export):
    result = run_cli("run", tiny_export, " ".join(["w5"] * 80), "--raw")
    assert result.exit_code == 1
    assert "context" in result.output and "64" in result.output


def test_validate_usage_errors(tiny_export, tmp_path):
    bad = tmp_path / "prompts.json"
    bad.write_text('{"not": "a list"}')
    assert_one_line_error(run_cli("validate", tiny_export, "--prompts", bad), 2, "JSON list")
    assert_one_line_error(run_cli("validate", tiny_export, "--threshold", "speed=3"), 2, "unknown threshold")


def test_force_never_replaces_an_unrelated_folder(tiny_models, tmp_path):
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = run_cli("onnx", "--model", tiny_models["gqa_tied"][0], "--output", precious, "--force", "-q")
    assert_one_line_error(result, 1, "not a smolexport export")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_checkpoint_missing_a_tensor(tiny_models, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_models["gqa_tied"][0], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    result = run_cli("onnx", "--model", folder, "--output", tmp_path / "out", "-q")
    assert_one_line_error(result, 1, "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists()


def test_bad_sampling_flags_and_output_paths(tiny_export, tmp_path):
    assert run_cli("run", tiny_export, "hi", "--top-p", "0").exit_code == 2
    assert_one_line_error(run_cli("run", tiny_export, "hi", "--stop", ""), 2, "--stop")
    result = run_cli("validate", tiny_export, "--json", tmp_path / "no" / "such" / "report.json")
    assert_one_line_error(result, 2, "does not exist")


def test_kv_cache_flag_reaches_the_manifest_and_needs_the_fused_graph(tiny_models, tmp_path):
    args = ["onnx", "--model", tiny_models["gqa_tied"][0], "--kv-cache", "fp16", "-q"]
    result = run_cli(*args, "--output", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "smolexport.json").read_text())["kv_cache"]["dtype"] == "float16"
    result = run_cli(*args, "--standard-ops", "--output", tmp_path / "standard")
    assert_one_line_error(result, 2, "--kv-cache fp16 needs the fused graph")
    assert not (tmp_path / "standard").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    import errno

    import smolexport.onnx.export as export_module

    def disk_full(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "genai_config.json"))

    monkeypatch.setattr(export_module, "write_genai_config", disk_full)
    result = run_cli(
        "onnx", "--model", tiny_models["gqa_tied"][0], "--quant", "fp32", "--output", tmp_path / "out", "-q"
    )
    assert_one_line_error(result, 1, "no space left to write", "genai_config.json")
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no lock file


def test_an_output_under_a_file(tiny_models, tmp_path):
    (tmp_path / "afile").write_text("x")
    result = run_cli("onnx", "--model", tiny_models["gqa_tied"][0], "--output", tmp_path / "afile" / "sub", "-q")
    assert_one_line_error(result, 1, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(sys.platform == "win32", reason="the output lock is POSIX flock")
def test_a_second_export_into_the_same_folder_fails_while_the_first_runs(tiny_models, tmp_path):
    import subprocess

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from smolexport.packaging import staged_output\n"
         "with staged_output(Path(sys.argv[1]), False) as s:\n"
         "    (s / 'model.onnx').write_bytes(b'first')\n    print(s, flush=True)\n    sys.stdin.readline()\n",
         str(tmp_path / "out")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip()
        for force in ([], ["--force"]):
            args = ["onnx", "--model", tiny_models["gqa_tied"][0], "--quant", "fp32", "--output", tmp_path / "out"]
            assert_one_line_error(run_cli(*args, *force, "-q"), 1, "another export into", "is running")
    finally:
        child.communicate("\n", timeout=60)
    assert child.returncode == 0 and (tmp_path / "out" / "model.onnx").read_bytes() == b"first"
    # Once the first is done, a second without --force is refused as before, and never replaces it silently.
    result = run_cli("onnx", "--model", tiny_models["gqa_tied"][0], "--quant", "fp32", "--output", tmp_path / "out")
    assert_one_line_error(result, 1, "already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_export_records_no_path_of_the_build_machine(tiny_export, tiny_models):
    source = tiny_models["gqa_tied"][0]
    manifest = json.loads((tiny_export / "smolexport.json").read_text())
    assert manifest["source"] == {"spec": source.name, "kind": "hf-folder"}
    assert json.loads((tiny_export / "config.json").read_text())["_name_or_path"] == source.name
    for path in (p for p in tiny_export.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for private in (str(source.parent), str(tiny_export.parent), str(Path.home())):
            assert private.encode() not in data, f"{path.name} holds {private}"


def test_validate_asks_for_the_reference_of_a_local_source(tiny_export, tiny_models):
    assert_one_line_error(run_cli("validate", tiny_export, "-q"), 1, "--reference", tiny_models["gqa_tied"][0].name)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["", "--max-new-tokens", "2"], 2, "PROMPT is empty"),
        (["  ", "--max-new-tokens", "2"], 2, "PROMPT is empty"),
        (["w5", "--temperature", "nan"], 1, "temperature must be a finite number"),
        (["w5", "--system", "\udcff"], 2, "--system is not valid UTF-8"),
        (["w5", "--prompt-lookup", "4", "--temperature", "0.7"], 2, "greedy, unconstrained answers only"),
    ],
)
def test_run_refuses_bad_arguments_in_one_line(tiny_export, args, code, fragment):
    assert_one_line_error(run_cli("run", tiny_export, *args), code, fragment)


def test_run_with_a_command_line_that_is_not_utf8(tiny_export):
    import subprocess

    argv = [
        sys.executable,
        "-m",
        "smolexport.cli",
        "run",
        str(tiny_export).encode(),
        b"caf\xe9",
        "--max-new-tokens",
        "2",
    ]
    result = subprocess.run(
        argv, capture_output=True, timeout=120, env={**__import__("os").environ, "LC_ALL": "C.UTF-8"}
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip() == "error: PROMPT is not valid UTF-8 text (check the terminal's encoding)"
