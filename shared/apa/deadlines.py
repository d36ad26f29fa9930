"""GDPR deadlines of erasure requests: due one calendar month after the request (Art. 12(3)).

Every erasure request carries `due_at` = `requested_at` + one month (the same day of the next month;
the last day of that month when it is shorter: 31 January -> 28/29 February). A request is open
until it is completed (every affected shard serves a retrained adapter); an open request past its
due date is overdue. The registry API lists them (`GET /erasure-deadlines?within_days=N`) and so
does `apa audit deadlines`.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from apa.db.models import ErasureRequest, utcnow

DEFAULT_WITHIN_DAYS = 7
"""`apa audit deadlines` and the API list the requests due within this many days by default."""
MAX_WITHIN_DAYS = 3660


def due_date(requested_at: datetime) -> datetime:
    """`requested_at` + one calendar month (day clamped to the month's last day): the latest
    moment the erasure may complete (GDPR Art. 12(3)). OverflowError past year 9999."""
    year, month = (
        (requested_at.year + 1, 1)
        if requested_at.month == 12
        else (requested_at.year, requested_at.month + 1)
    )
    if year > datetime.max.year:
        raise OverflowError(f"{requested_at.isoformat()} + one month is past year {datetime.max.year}")
    last_day = calendar.monthrange(year, month)[1]
    return requested_at.replace(year=year, month=month, day=min(requested_at.day, last_day))


@dataclass(frozen=True)
class Deadline:
    """An open request with its due date."""

    request_id: str
    user_pid: str
    status: str
    requested_at: datetime
    due_at: datetime
    state: Literal["overdue", "due_soon"]
    days_left: float
    """Days until due_at (negative: overdue by that many days)."""

    def to_json(self) -> dict[str, Any]:
        from apa.db.audit import format_ts

        return {
            "request_id": self.request_id,
            "user_pid": self.user_pid,
            "status": self.status,
            "requested_at": format_ts(self.requested_at),
            "due_at": format_ts(self.due_at),
            "state": self.state,
            "days_left": round(self.days_left, 2),
        }


def open_deadlines(
    session: Session, *, within_days: float = DEFAULT_WITHIN_DAYS, now: datetime | None = None
) -> list[Deadline]:
    """Requests not completed that are overdue or due within `within_days` days, soonest first."""
    if not 0 <= within_days <= MAX_WITHIN_DAYS:
        raise ValueError(f"within_days must be between 0 and {MAX_WITHIN_DAYS}, got {within_days}")
    now = now or utcnow()
    horizon = now + timedelta(days=within_days)
    rows = session.scalars(
        select(ErasureRequest)
        .where(ErasureRequest.status != "completed", ErasureRequest.due_at <= horizon)
        .order_by(ErasureRequest.due_at, ErasureRequest.request_id)
    )
    found = []
    for r in rows:
        due = r.due_at if r.due_at is not None else due_date(r.requested_at)
        found.append(
            Deadline(
                request_id=r.request_id,
                user_pid=r.user_pid,
                status=r.status,
                requested_at=r.requested_at,
                due_at=due,
                state="overdue" if due < now else "due_soon",
                days_left=(due - now).total_seconds() / 86400,
            )
        )
    return found


def deadlines_view(
    session: Session, *, within_days: float = DEFAULT_WITHIN_DAYS, now: datetime | None = None
) -> dict[str, Any]:
    """JSON for the API and the CLI: `overdue` and `due_soon` lists of open requests."""
    from apa.db.audit import format_ts

    now = now or utcnow()
    found = open_deadlines(session, within_days=within_days, now=now)
    return {
        "as_of": format_ts(now),
        "within_days": within_days,
        "overdue": [d.to_json() for d in found if d.state == "overdue"],
        "due_soon": [d.to_json() for d in found if d.state == "due_soon"],
    }


def print_deadlines(view: dict[str, Any]) -> None:
    """The deadlines view as lines a compliance officer reads (users by pseudonym prefix only)."""
    overdue, soon = view["overdue"], view["due_soon"]
    print(
        f"erasure deadlines as of {view['as_of']}: {len(overdue)} overdue, "
        f"{len(soon)} due within {view['within_days']:g} days"
    )
    for item in overdue + soon:
        label = "OVERDUE" if item["state"] == "overdue" else "due"
        print(
            f"  {label:<8} {item['due_at']}  request {item['request_id']}  user {item['user_pid'][:12]}  "
            f"status {item['status']}  ({item['days_left']:+.1f} days)"
        )


def deadlines_command(within_days: float = DEFAULT_WITHIN_DAYS, url: str | None = None) -> int:
    """List the open erasure requests that are overdue or due soon; exit 1 when one is overdue.

    A request is due one calendar month after it was made (GDPR Art. 12(3)) and open until every
    affected shard serves a retrained adapter.

    Args:
        within_days: also list requests due within this many days.
        url: database URL (default: APA_DATABASE_URL).
    """
    from apa.db.session import check_schema, make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        check_schema(engine)
        with make_sessionmaker(engine)() as session:
            view = deadlines_view(session, within_days=within_days)
    finally:
        engine.dispose()
    print_deadlines(view)
    return 1 if view["overdue"] else 0


__all__ = ["Deadline", "deadlines_command", "deadlines_view", "due_date", "open_deadlines", "print_deadlines"]
