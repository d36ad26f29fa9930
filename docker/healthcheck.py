#!/usr/bin/env python3
"""Health checks for the APA containers, with the standard library only (fast to start).

    apa-healthcheck http URL [--timeout S]           exit 0 when GET URL answers 2xx
    apa-healthcheck file PATH [--max-age S]          exit 0 when PATH exists and was touched
                                                     within the last S seconds

The registry and inference replicas serve /healthz (the process is up) and /readyz (ready for
traffic). The erasure consumer and the trainer worker have no HTTP port: each touches a liveness
file while its loop is alive (APA_LIVENESS_FILE), which the `file` check reads. Docker (HEALTHCHECK,
compose `healthcheck`) and Kubernetes (`exec` probes) run this same command.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300, f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def check_file(path: Path, max_age: float) -> tuple[bool, str]:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError as exc:
        return False, f"{path}: {exc.strerror or exc}"
    return age <= max_age, f"{path}: touched {age:.0f} s ago (limit {max_age:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="apa-healthcheck", description=__doc__.splitlines()[0])
    checks = parser.add_subparsers(dest="check", required=True)
    http = checks.add_parser("http", help="GET a URL; healthy on 2xx")
    http.add_argument("url")
    http.add_argument("--timeout", type=float, default=3.0)
    file = checks.add_parser("file", help="a liveness file touched recently")
    file.add_argument("path", type=Path)
    file.add_argument("--max-age", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.check == "http":
        ok, message = check_http(args.url, args.timeout)
    else:
        ok, message = check_file(args.path, args.max_age)
    print(("healthy: " if ok else "unhealthy: ") + message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
