"""`apa.http_server`: every service's gunicorn app carries the request limits its API declares."""

from __future__ import annotations

from flask import Flask

from apa import validation
from apa.http_server import GunicornApp


def test_the_request_limits_are_set_and_cannot_be_loosened_by_a_service():
    built: list[Flask] = []

    def factory() -> Flask:
        built.append(Flask("probe"))
        return built[-1]

    app = GunicornApp(factory, {"bind": "127.0.0.1:0", "workers": 3, "limit_request_line": 10**6})
    assert app.cfg.limit_request_line == validation.MAX_URL_BYTES
    assert app.cfg.limit_request_fields == validation.MAX_HEADER_FIELDS
    assert app.cfg.limit_request_field_size == validation.MAX_HEADER_BYTES
    assert (app.cfg.workers, app.cfg.bind, app.cfg.accesslog) == (3, ["127.0.0.1:0"], "-")
    assert built == []  # the factory runs in each worker, not in the master
    assert app.load() is built[0]
