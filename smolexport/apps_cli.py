"""`smolexport serve` and `smolexport chat`: command-line entry points to the sample apps in `sample_apps/`.

The apps use only the lightweight runtime; this module imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click

from .cli_errors import user_errors
from .cli_options import speculation_options
from .errors import SmolexportError


def sample_app(name: str) -> ModuleType:
    """Imports `sample_apps.<name>`: installed, or from the source checkout this package lives in."""
    try:
        return importlib.import_module(f"sample_apps.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("sample_apps", f"sample_apps.{name}"):
            raise
    root = Path(__file__).resolve().parent.parent / "sample_apps"
    if not (root / name / "__init__.py").is_file():
        raise SmolexportError(
            f"the sample app {name!r} is not installed: it ships in the sample_apps/ folder of the smolexport "
            "source repository; install smolexport from a checkout (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(
        "sample_apps", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["sample_apps"] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"sample_apps.{name}")


def _load_model(export_dir: Path, provider: str, threads: int | None):
    from smolexport_runtime import load

    return load(export_dir, providers=provider, threads=threads)


_provider = click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
_threads = click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime intra-op threads.")


@click.command("serve")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: all).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="SMOLEXPORT_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' (or set SMOLEXPORT_API_KEY).",
)
@click.option("--model-name", default=None, help="Model id clients ask for (default: the folder name).")
@click.option(
    "--max-tokens",
    "default_max_tokens",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Answer length when a request sets none.",
)
@click.option(
    "--temperature",
    "default_temperature",
    type=click.FloatRange(0, 2),
    default=0.7,
    show_default=True,
    help="Temperature when a request sets none.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=8,
    show_default=True,
    help="Requests decoded together in one batched step; more wait in the queue.",
)
@click.option(
    "--max-queue", type=click.IntRange(1), default=64, show_default=True, help="Requests allowed to wait; then 503."
)
@click.option(
    "--context",
    type=click.IntRange(16),
    default=None,
    help="Tokens per request (prompt + answer), each slot's KV buffer; default 2048 or the model's if shorter.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.1),
    default=60.0,
    show_default=True,
    help="Seconds a request may take to arrive (head and body); slower ones are cut off.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Open connections served at once; past them requests get 503.",
)
@speculation_options("For a greedy request decoding alone")
@_provider
@_threads
@click.option("--quiet", "-q", is_flag=True, help="Do not log requests.")
@user_errors
def serve_command(
    export_dir, host, port, api_key, model_name, default_max_tokens, default_temperature, max_batch, max_queue,
    context, timeout, max_connections, prompt_lookup, draft_model, draft_tokens, provider, threads, quiet,
):  # fmt: skip
    """Serve an export with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models)."""
    try:
        server_module = sample_app("openai_server")
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn", "h11"):
            raise
        raise SmolexportError(
            f"the server needs starlette and uvicorn ({exc.name} is missing): pip install 'smolexport[apps]'"
        ) from None
    try:
        server_module.check_api_key(api_key)  # before loading the model; the app checks it again
    except ValueError:
        raise click.UsageError("--api-key / SMOLEXPORT_API_KEY is empty or starts or ends with whitespace") from None
    model = _load_model(export_dir, provider, threads)
    drafter = _load_model(draft_model, provider, threads) if draft_model is not None else None
    try:
        server = server_module.make_server(
            export_dir,
            host,
            port,
            api_key,
            model=model,
            model_name=model_name,
            default_max_tokens=default_max_tokens,
            default_temperature=default_temperature,
            max_batch=max_batch,
            max_queue=max_queue,
            context=context,
            log_requests=not quiet,
            timeout=timeout,
            max_connections=max_connections,
            prompt_lookup=prompt_lookup,
            draft_model=drafter,
            draft_tokens=draft_tokens,
        )
    except OSError as exc:
        raise SmolexportError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    auth = "; clients must send the API key" if api_key else ""
    click.echo(f"serving {server.service.name} at {server.url}{auth} (Ctrl-C to stop)", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    finally:
        server.server_close()


@click.command("chat")
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.7, show_default=True, help="0: greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option(
    "--prompt-cache",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="File for the system prompt's KV cache: loaded at start (or computed and saved), so the first "
    "answer does not prefill the system prompt.",
)
@click.option(
    "--tools",
    is_flag=True,
    help="Offer the model a calculator and the current time (tool_choice auto); calls and results are shown. "
    "Needs llguidance (pip install 'smolexport-runtime[structured]').",
)
@_provider
@_threads
@user_errors
def chat_command(export_dir, system, max_new_tokens, temperature, top_p, seed, prompt_cache, tools, provider, threads):
    """Chat with an export in the terminal (multi-turn; /reset, /system TEXT, /exit; --tools)."""
    chat_module = sample_app("terminal_chat")
    model = _load_model(export_dir, provider, threads)
    chat_module.chat(
        model,
        system=system,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        prompt_cache=prompt_cache,
        tools=tools,
    )
