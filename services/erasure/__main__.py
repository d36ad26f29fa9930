"""`python -m services.erasure`: run the erasure consumer (the same command as `apa run-erasure-consumer`)."""

from __future__ import annotations

import sys

from apa.cli import run
from services.erasure.consumer import run_command

if __name__ == "__main__":
    raise SystemExit(run(run_command, sys.argv[1:], prog="python -m services.erasure"))
