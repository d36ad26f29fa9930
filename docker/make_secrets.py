#!/usr/bin/env python3
"""Create the secret files docker-compose.yml mounts (random values; existing files are kept).

    python3 docker/make_secrets.py [DIR]     (default: ./secrets, next to docker-compose.yml)

Each `APA_*` file becomes that variable inside the APA containers (docker/entrypoint.sh). The
Postgres password and the RabbitMQ credentials are generated once and written into the URLs the
services use, so the files agree with each other. Keep DIR out of version control (.gitignore has
/secrets/); back up APA_PSEUDONYM_KEY: the registry's pseudonyms cannot be recomputed without it.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

DB_USER = "apa"
DB_NAME = "apa"
BROKER_USER = "apa"
BROKER_VHOST = "apa"


def secret_files(existing: dict[str, str]) -> dict[str, str]:
    """Every secret file's content, keeping the values of `existing` files."""
    pg_password = existing.get("postgres_password") or secrets.token_urlsafe(24)
    broker_password = existing.get("rabbitmq_password") or secrets.token_urlsafe(24)
    return {
        "postgres_password": pg_password,
        "rabbitmq_password": broker_password,
        # RabbitMQ reads /etc/rabbitmq/conf.d/*.conf: the user the services log in as.
        "rabbitmq.conf": (
            f"default_user = {BROKER_USER}\ndefault_pass = {broker_password}\ndefault_vhost = {BROKER_VHOST}\n"
            "default_permissions.configure = .*\ndefault_permissions.read = .*\n"
            "default_permissions.write = .*\n"
        ),
        "APA_DATABASE_URL": f"postgresql+psycopg2://{DB_USER}:{pg_password}@postgres:5432/{DB_NAME}",
        "APA_CELERY_BROKER_URL": f"amqp://{BROKER_USER}:{broker_password}@rabbitmq:5672/{BROKER_VHOST}",
        "APA_API_TOKEN": existing.get("APA_API_TOKEN") or secrets.token_urlsafe(32),
        "APA_REPLICA_TOKEN": existing.get("APA_REPLICA_TOKEN") or secrets.token_urlsafe(32),
        "APA_PSEUDONYM_KEY": existing.get("APA_PSEUDONYM_KEY") or secrets.token_hex(32),
        "APA_AUDIT_KEY": existing.get("APA_AUDIT_KEY") or secrets.token_hex(32),
        # Ed25519 private key (32 bytes, hex): signs erasure receipts and audit anchors; registry only
        "APA_SIGNING_KEY": existing.get("APA_SIGNING_KEY") or secrets.token_hex(32),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "secrets")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    existing = {p.name: p.read_text().strip() for p in out.iterdir() if p.is_file()}
    created = []
    for name, value in secret_files(existing).items():
        path = out / name
        if path.exists():
            continue
        # Compose bind-mounts the file as is, and the services run as uid 10001: the file must be
        # readable by it, so the folder (0700) is what keeps other local users out.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(value if value.endswith("\n") else value + "\n")
        created.append(name)
    print(f"{out}: created {', '.join(created) if created else 'nothing (all present)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
