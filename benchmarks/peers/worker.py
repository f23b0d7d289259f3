"""Runs one peer runtime inside its own virtual environment; the harnesses (fidelity.py, speed.py) call it.

    python worker.py logits BACKEND MODEL TOKENS.json OUT.npz      # teacher-forced logits of each sequence
    python worker.py speed BACKEND MODEL WORKLOAD.json OUT.json     # the `smolexport bench` workload
    python worker.py quantize SRC.gguf DST.gguf TYPE                # llama.cpp's quantizer (Q4_0, Q4_K_M, Q8_0)
    python worker.py chat BACKEND MODEL WORKLOAD.json OUT.json      # replayed chat with prefix reuse, decode
    python worker.py cold BACKEND MODEL IDS.json                    # load, then print "first-token"
    python worker.py decode BACKEND MODEL WORKLOAD.json OUT.json     # decode bursts only (decode_ab.py)

BACKEND: llamacpp (a .gguf, llama-cpp-python), genai (an onnxruntime-genai model-builder folder, its generate
API), optimum (an optimum ONNX export folder, ORTModelForCausalLM), torch (a HF folder, transformers eager fp32).
Token ids come from the harness (the project's tokenizer), so every runtime sees the same ids.
Two threads everywhere. Only the standard library and the backend's own packages are imported here.
"""

from __future__ import annotations

import ctypes
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

THREADS = 2


# --- llama.cpp ----------------------------------------------------------------------------------------


def refuse_amx() -> None:
    """Make arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) fail with EPERM in this process (seccomp filter).

    ggml's CPU backend asks for AMX tile permission at start-up and, when refused, runs without its AMX
    buffer type: llama.cpp's AMX path crashes at the first decode on this VM's CPU (llama.cpp issue 20824).
    """
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1
    prog = [
        (ld, 0, 0, 4), (jeq, 0, 5, 0xC000003E),  # seccomp_data.arch == AUDIT_ARCH_X86_64
        (ld, 0, 0, 0), (jeq, 0, 3, 158),  # nr == arch_prctl
        (ld, 0, 0, 16), (jeq, 0, 1, 0x1023),  # args[0] == ARCH_REQ_XCOMP_PERM
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]  # fmt: skip

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(22, 2, ctypes.byref(Prog(len(prog), filters)), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def llama_cpp_module():
    refuse_amx()
    import llama_cpp

    return llama_cpp


class LlamaCpp:
    def __init__(self, model: str, context: int = 2048, logits_all: bool = False):
        llama_cpp = llama_cpp_module()
        self.llm = llama_cpp.Llama(
            model_path=model, n_ctx=context, n_batch=512, n_threads=THREADS, n_threads_batch=THREADS,
            logits_all=logits_all, verbose=False,
        )  # fmt: skip
        self.lib, self.n_vocab = llama_cpp, self.llm.n_vocab()

    def _pick(self):
        # without logits_all, llama-cpp-python keeps no scores: read the last position's logits from llama.cpp
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def prefill(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._pick()

    def step(self, token):
        self.llm.eval([token])
        return self._pick()

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


# --- onnxruntime-genai ----------------------------------------------------------------------------------


class Genai:
    def __init__(self, model: str, context: int = 2048):
        import onnxruntime_genai as og

        self.og = og
        config_path = Path(model) / "genai_config.json"
        config = json.loads(config_path.read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        if options.get("intra_op_num_threads") != THREADS:
            options["intra_op_num_threads"] = THREADS
            config_path.write_text(json.dumps(config, indent=4))
        self.model = og.Model(model)
        self.context = context
        self.gen = None

    def _generator(self, max_length):
        params = self.og.GeneratorParams(self.model)
        # min_length masks eos until max_length: the workload decodes a fixed number of tokens
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
        return self.og.Generator(self.model, params)

    def prefill(self, ids, max_length=None):
        self.gen = self._generator(max_length or self.context + 1)  # + the token picked last
        self.gen.append_tokens(np.array(ids, dtype=np.int32))
        return self._pick()

    def _pick(self):
        # the generator's own greedy step: after append_tokens it only picks; afterwards it runs the model
        self.gen.generate_next_token()
        return int(self.gen.get_next_tokens()[0])

    def step(self, token):
        return self._pick()

    def logits(self, ids):
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(np.array(ids, dtype=np.int32))
        out = np.array(gen.get_output("logits"), dtype=np.float32)
        return out.reshape(-1, out.shape[-1])[-len(ids) :]


# --- optimum ----------------------------------------------------------------------------------------------


class Optimum:
    def __init__(self, model: str, context: int = 2048):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(THREADS)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        file_name = "model_int4.onnx" if (Path(model) / "model_int4.onnx").exists() else "model.onnx"
        self.torch = torch
        self.model = ORTModelForCausalLM.from_pretrained(model, file_name=file_name, session_options=options)

    def _forward(self, ids, past, length):
        t = self.torch
        out = self.model(
            input_ids=t.tensor([ids]),
            attention_mask=t.ones(1, length, dtype=t.long),
            position_ids=t.arange(length - len(ids), length)[None, :],
            past_key_values=past,
            use_cache=True,
        )
        return out

    def prefill(self, ids):
        out = self._forward(ids, None, len(ids))
        self.past, self.length = out.past_key_values, len(ids)
        return int(out.logits[0, -1].argmax())

    def step(self, token):
        self.length += 1
        out = self._forward([token], self.past, self.length)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def logits(self, ids):
        return self._forward(ids, None, len(ids)).logits[0].float().numpy()


# --- PyTorch eager ----------------------------------------------------------------------------------------


class Torch:
    def __init__(self, model: str, context: int = 2048):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(THREADS)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def prefill(self, ids):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([ids]), use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, token):
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def logits(self, ids):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()


class Ours:
    """smolexport's runtime (pure Python over onnxruntime: it runs in this venv from the source tree), driven
    as `smolexport bench` drives it: prefill into a cache sized for prompt + answer, then one token a step."""

    def __init__(self, model: str, context: int = 2048):
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "runtimes" / "python"))
        from smolexport_runtime import load
        from smolexport_runtime.generate import decode_one_token, prefill

        self.decoder = load(model, providers="cpu", threads=THREADS, verify=False).decoder
        self._prefill, self._decode = prefill, decode_one_token
        self.context = context

    def prefill(self, ids):
        logits, self.cache, self.length = self._prefill(self.decoder, ids, capacity=min(self.context, len(ids) + 256))
        return int(np.argmax(logits))

    def step(self, token):
        logits, self.cache, self.length = self._decode(self.decoder, token, self.cache, self.length)
        return int(np.argmax(logits))


BACKENDS = {"llamacpp": LlamaCpp, "genai": Genai, "optimum": Optimum, "torch": Torch, "ours": Ours}


# --- commands ------------------------------------------------------------------------------------------


def cmd_logits(backend: str, model: str, tokens_file: str, out: str) -> None:
    sequences = json.loads(Path(tokens_file).read_text())
    longest = max(len(s) for s in sequences)
    kwargs = {"logits_all": True} if backend == "llamacpp" else {}
    runner = BACKENDS[backend](model, context=max(512, longest + 8), **kwargs)
    arrays = {f"seq{i}": runner.logits(seq) for i, seq in enumerate(sequences)}
    np.savez(out, **arrays)


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over from the parent across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def cmd_speed(backend: str, model: str, workload_file: str, out: str) -> None:
    w = json.loads(Path(workload_file).read_text())
    chat, long, filler = w["chat_ids"], w["long_ids"], w["context_ids"]
    runs, decode_tokens = w["runs"], w["decode_tokens"]
    runner = BACKENDS[backend](model, context=w["context"])
    token = runner.prefill(chat)  # warm-up
    for _ in range(8):
        token = runner.step(token)
    runner.prefill(long)
    chat_s, decode, long_s = [], [], []
    for _ in range(runs):
        seconds, token = timed(runner.prefill, chat)
        chat_s.append(seconds)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = runner.step(token)
        decode.append(decode_tokens / (time.perf_counter() - start))
        long_s.append(timed(runner.prefill, long)[0])
    token = runner.prefill(filler)  # memory with a full context
    for _ in range(16):
        token = runner.step(token)
    result = {
        "backend": backend,
        "model": model,
        "threads": THREADS,
        "runs": runs,
        "ttft_ms_chat": round(1000 * statistics.median(chat_s), 1),
        "ttft_ms_long": round(1000 * statistics.median(long_s), 1),
        "decode_tok_s": round(statistics.median(decode), 1),
        "peak_rss_mb": peak_rss_mb(),
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def decode_burst(runner, chat_ids: list[int], tokens: int) -> float:
    """Prefills the chat prompt, then decodes `tokens` greedily: the decode tokens/s."""
    token = runner.prefill(chat_ids)
    start = time.perf_counter()
    for _ in range(tokens):
        token = runner.step(token)
    return tokens / (time.perf_counter() - start)


def cmd_decode(backend: str, model: str, workload_file: str, out: str) -> None:
    """Decode speed alone: a warm-up burst, then `bursts` bursts that each prefill the chat prompt and decode
    `decode_tokens` greedily (tokens/s of each); benchmarks/decode_ab.py runs this once per model and round."""
    w = json.loads(Path(workload_file).read_text())
    runner = BACKENDS[backend](model, context=w["context"])
    decode_burst(runner, w["chat_ids"], 8)
    speeds = [decode_burst(runner, w["chat_ids"], w["decode_tokens"]) for _ in range(w["bursts"])]
    Path(out).write_text(json.dumps({"decode_tok_s": speeds, "peak_rss_mb": peak_rss_mb()}) + "\n")


def cmd_interleaved(workload_file: str, out: str, *models: str) -> None:
    """Decode speed of several models loaded in one process, measured in alternation: each round runs every
    model once (prefill the chat prompt, decode `decode_tokens` greedily), so that a slow spell of a shared
    machine hits every model alike. models: BACKEND=PATH. Writes each model's tokens/s per round."""
    w = json.loads(Path(workload_file).read_text())
    runners = {}
    for spec in models:
        backend, path = spec.split("=", 1)
        runners[spec] = BACKENDS[backend](path, context=w["context"])
    for runner in runners.values():  # warm-up
        decode_burst(runner, w["chat_ids"], w["decode_tokens"])
    rounds = {spec: [] for spec in runners}
    for _ in range(w["rounds"]):
        for spec, runner in runners.items():
            rounds[spec].append(decode_burst(runner, w["chat_ids"], w["decode_tokens"]))
    Path(out).write_text(json.dumps({"threads": THREADS, "rounds": rounds}, indent=1) + "\n")


# --- conversations (benchmarks/conversation.py) ------------------------------------------------------------


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class LlamaCppChat:
    """llama-cpp-python's own prefix reuse: `generate(tokens, reset=True)` keeps the longest common prefix of
    what the context holds and re-evaluates the rest (it always re-evaluates at least the last prompt token)."""

    def __init__(self, model: str, context: int):
        self.llm = LlamaCpp(model, context).llm

    def turn(self, ids, answer_tokens):
        start = time.perf_counter()
        tokens = self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        first = next(tokens)
        ttft = time.perf_counter() - start
        out = [first]
        for token in tokens:
            if len(out) >= answer_tokens:
                break
            out.append(token)
        tokens.close()
        return ttft, out


class GenaiChat:
    """onnxruntime-genai's continuous decoding: one generator for the conversation; each turn rewinds it to
    the longest common prefix with the new prompt (`rewind_to`) and appends the rest (`append_tokens`)."""

    def __init__(self, model: str, context: int):
        self.genai = Genai(model, context)
        self.gen = self.genai._generator(context)
        self.tokens: list[int] = []

    def turn(self, ids, answer_tokens):
        start = time.perf_counter()
        keep = min(common_prefix(self.tokens, ids), len(ids) - 1)
        if keep < len(self.tokens):
            self.gen.rewind_to(keep)
        self.gen.append_tokens(np.array(ids[keep:], dtype=np.int32))
        self.gen.generate_next_token()
        out = [int(self.gen.get_next_tokens()[0])]
        ttft = time.perf_counter() - start
        while len(out) < answer_tokens:
            self.gen.generate_next_token()
            out.append(int(self.gen.get_next_tokens()[0]))
        # The generator holds the prompt and every generated token but the last one fed back next.
        self.tokens = list(ids) + out[:-1]
        return ttft, out


CHAT_BACKENDS = {"llamacpp": LlamaCppChat, "genai": GenaiChat}


def cmd_chat(backend: str, model: str, workload_file: str, out: str) -> None:
    """Each replay: one conversation object, the turns in order, time to first token per turn (medians over
    runs, after one warm-up replay of two turns); then single-stream greedy decode of `decode_tokens`."""
    w = json.loads(Path(workload_file).read_text())
    turns, answer_tokens, runs = w["turns"], w["answer_tokens"], w["runs"]
    warm = CHAT_BACKENDS[backend](model, w["context"])
    for ids in turns[:2]:
        warm.turn(ids, answer_tokens)
    del warm
    per_run = []
    for _ in range(runs):
        chat = CHAT_BACKENDS[backend](model, w["context"])
        per_run.append([chat.turn(ids, answer_tokens)[0] for ids in turns])
        del chat
    runner = BACKENDS[backend](model, context=w["context"])
    decode = []
    for _ in range(runs):
        token = runner.prefill(w["decode_prompt"])
        start = time.perf_counter()
        for _ in range(w["decode_tokens"]):
            token = runner.step(token)
        decode.append(w["decode_tokens"] / (time.perf_counter() - start))
    result = {
        "backend": backend,
        "ttft_ms_reused": [round(1000 * statistics.median(t), 1) for t in zip(*per_run, strict=True)],
        "decode_tok_s": round(statistics.median(decode), 1),
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def cmd_cold(backend: str, model: str, ids_file: str) -> None:
    """Load the model and produce the first token of the prompt; the harness times this process."""
    ids = json.loads(Path(ids_file).read_text())
    runner = BACKENDS[backend](model, context=2048)
    runner.prefill(ids)
    print("first-token", flush=True)


def cmd_quantize(src: str, dst: str, kind: str) -> None:
    llama_cpp = llama_cpp_module()
    ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
             "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]  # fmt: skip
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = THREADS
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def main(argv: list[str]) -> None:
    command, *args = argv
    commands = {
        "logits": cmd_logits,
        "speed": cmd_speed,
        "quantize": cmd_quantize,
        "chat": cmd_chat,
        "cold": cmd_cold,
        "interleaved": cmd_interleaved,
        "decode": cmd_decode,
    }
    commands[command](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
