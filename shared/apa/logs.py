"""Logging of the services: one format, the service's level, and the chatty client libraries quiet.

kafka-python logs every connection and metadata refresh at INFO and Alembic every plugin it sets
up: at the services' default level (INFO) that would bury what the service itself says. Those
loggers stay at WARNING unless the service runs at DEBUG.
"""

from __future__ import annotations

import logging

QUIET = ("kafka", "alembic.runtime.plugins", "alembic.runtime.migration", "kombu", "amqp")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Log to stderr at `level` (a name: DEBUG, INFO, ...); client libraries at WARNING unless DEBUG."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(level=numeric if isinstance(numeric, int) else logging.INFO, format=FORMAT)
    if level.upper() != "DEBUG":
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)


__all__ = ["configure_logging"]
