"""`python -m sample_apps.openai_server EXPORT_DIR [--host H] [--port P] [--api-key K]`: serves until Ctrl-C."""

import argparse

from .server import serve
from .transport import check_api_key

parser = argparse.ArgumentParser(prog="python -m sample_apps.openai_server", description=__doc__.split(":")[0])
parser.add_argument("model_dir")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--api-key", default=None)
args = parser.parse_args()
try:
    check_api_key(args.api_key)
except ValueError as exc:
    parser.error(f"--api-key: {exc}")
serve(args.model_dir, args.host, args.port, args.api_key, log_requests=True)
