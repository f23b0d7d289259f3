"""Sample apps built on the lightweight runtime `smolexport_runtime` (no torch): copy them into your project.

- `openai_server`: an OpenAI-compatible HTTP server (`smolexport serve DIR`).
- `terminal_chat`: a multi-turn chat in the terminal (`smolexport chat DIR`).
- `desktop_chat`: a Qt (PySide6) chat window.
- `extract`: a typed object (a Pydantic model or a JSON Schema) from free text.
- `builtin_tools`: the chats' built-in tools (a calculator, the current time) and their round trip.
- `ci_validation`: a GitHub Actions workflow and a pytest example that gate an export on fidelity and latency.
"""
