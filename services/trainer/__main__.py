"""`python -m services.trainer`: run a trainer worker (the same command as `apa run-worker`)."""

from __future__ import annotations

import sys

from apa.cli import run
from services.trainer.worker import run_worker_command

if __name__ == "__main__":
    raise SystemExit(run(run_worker_command, sys.argv[1:], prog="python -m services.trainer"))
