"""Serve a Flask app factory with gunicorn, with the request limits every APA API declares.

The registry and inference services differ only in their factory and a few options (workers,
threads, timeout); both answer an over-long URL with 414 and too many or too long headers with 431
(`apa.validation`'s limits, which their OpenAPI documents declare). `GunicornApp` carries those
limits so that no service can be started without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from apa import validation

REQUEST_LIMITS: dict[str, int] = {
    "limit_request_line": validation.MAX_URL_BYTES,
    "limit_request_fields": validation.MAX_HEADER_FIELDS,
    "limit_request_field_size": validation.MAX_HEADER_BYTES,
}
"""gunicorn's request limits: the URL (414) and header (431) limits of `apa.validation`."""


class GunicornApp(BaseApplication):  # type: ignore[misc]
    """A gunicorn application that calls `factory` once in each worker (its own engine, pool or
    model replica) and runs with `options` on top of `REQUEST_LIMITS` and an access log on stdout."""

    def __init__(self, factory: Callable[[], Flask], options: dict[str, Any]) -> None:
        self.factory = factory
        self.options = {"accesslog": "-", **options, **REQUEST_LIMITS}
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.factory()


def serve(factory: Callable[[], Flask], host: str, port: int, workers: int, **options: Any) -> None:
    """Run `factory`'s app on host:port with `workers` gunicorn worker processes until stopped."""
    GunicornApp(factory, {"bind": f"{host}:{port}", "workers": workers, **options}).run()
