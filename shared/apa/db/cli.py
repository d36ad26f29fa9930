"""`apa db upgrade|downgrade|current` and `apa erase`."""

from __future__ import annotations

import json
import sys
from typing import Literal

from apa.db import registry
from apa.db.models import ErasureRequest
from apa.db.session import (
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    session_scope,
    upgrade,
)
from apa.events import ErasureRequested, EventValidationError, ShardEvent, build_event_bus
from apa.settings import Settings


def db_command(
    action: Literal["upgrade", "downgrade", "current"], revision: str | None = None, url: str | None = None
) -> int:
    """Run the registry's Alembic migrations.

    Args:
        action: upgrade (to head by default) | downgrade (one step by default) | current.
        revision: target revision (`head`, `base`, `-1`, a revision id).
        url: database URL (default: APA_DATABASE_URL).
    """
    engine = make_engine(url)
    try:
        if action == "upgrade":
            upgrade(engine, revision or "head")
        elif action == "downgrade":
            downgrade(engine, revision or "-1")
        current, head = current_revision(engine), head_revision()
        state = "at head" if current == head else f"head is {head}"
        print(f"{engine.url.render_as_string(hide_password=True)}: revision {current or '(none)'} ({state})")
        return 0
    finally:
        engine.dispose()


def erase_command(
    user_id: str | None = None,
    interactions: list[str] | None = None,
    request_id: str | None = None,
    url: str | None = None,
    publish: bool = False,
) -> int:
    """Record an erasure request in the registry and print its status.

    One transaction, as the erasure service does it: erases the user's samples (or only those
    holding the given interactions) in every split, marks their shards stale and excludes the
    adapters trained on them; then scrubs the registered model directories on this machine.

    Args:
        user_id: the user whose data is erased (required).
        interactions: only these interaction ids of the user, e.g. --interactions '[i1,i2]'.
        request_id: idempotency key (default: a new UUID).
        url: database URL (default: APA_DATABASE_URL).
        publish: also publish the stale shards on the shard-events topic.
    """
    from apa.lifecycle import handle_erasure, scrub_model_dirs
    from apa.pseudonyms import pseudonymizer_from_settings

    if not user_id:
        print("apa erase: --user-id is required", file=sys.stderr)
        return 2
    try:
        event = (
            ErasureRequested(request_id=request_id, user_id=user_id, interactions=interactions)
            if request_id
            else ErasureRequested.create(user_id, interactions)
        )
    except EventValidationError as exc:
        print(f"apa erase: {exc}", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    pseudonymizer = pseudonymizer_from_settings(settings)
    engine = make_engine(url, settings=settings)
    try:
        check_schema(engine)
        with session_scope(engine) as session:
            live_seconds = settings.replica_live_seconds
            outcome = handle_erasure(session, event, pseudonymizer)
            request = session.get(ErasureRequest, outcome.request_id)
            view = registry.request_view(session, request, replica_live_seconds=live_seconds)  # type: ignore[arg-type]
        with session_scope(engine) as session:
            scrub_model_dirs(session, pseudonymizer)
    except registry.ConflictError as exc:
        print(f"apa erase: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    view["created"] = outcome.created
    view["stale_shards"] = sorted(shard.key for shard in outcome.stale)
    print(json.dumps(view, indent=2))
    if publish:
        bus = build_event_bus(settings)
        for shard, generation in sorted(outcome.stale.items()):
            event_out = ShardEvent(shard_id=shard.key, state="stale", generation=generation)
            bus.publish(settings.shard_events_topic, shard.key, event_out.to_dict())
    return 0
