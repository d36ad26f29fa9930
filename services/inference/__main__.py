"""`python -m services.inference`: serve the inference API (the same command as `apa serve-inference`)."""

from __future__ import annotations

import sys

from apa.cli import run
from services.inference.app import serve_command

if __name__ == "__main__":
    raise SystemExit(run(serve_command, sys.argv[1:], prog="python -m services.inference"))
