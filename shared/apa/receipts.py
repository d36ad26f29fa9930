"""Erasure receipts: a signed JSON document a regulator checks offline (docs/ARCHITECTURE.md §7).

`GET /erasures/{id}/receipt` returns `{"receipt": {...}, "signature": {...}}`. The receipt holds the
request (by the user's pseudonym only), its times, every affected shard's excluded and retrained
adapter versions with their weights' sha256 and manifest digest, the audit rows about the request
(id, time, event, hash) with their sequence range, and the signed anchor of the chain head that
covers the newest of them. The signature is Ed25519 (`apa.signing`) over the canonical JSON of
`receipt`; the anchor inside is signed by the same key.

`check_receipt` (and `apa audit check-receipt FILE`) needs neither the database nor a secret: it
checks the signature (against the published public key when given), the anchor's signature, that
the anchor covers the audit rows, and that the receipt is consistent in itself. What it cannot
check offline is that the rows are in the chain: the chain is keyed, so that proof is the
controller's `apa audit verify --anchors` against the same anchor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from apa.db import audit
from apa.db.models import AdapterVersion, ErasureRequest, ErasureRequestShard, RegistryMeta
from apa.signing import ALGORITHM, PublicKey, SigningKey

RECEIPT_FORMAT = "apa.erasure-receipt/1"
TIMES = (
    "requested_at",
    "received_at",
    "excluded_at",
    "retraining_at",
    "completed_at",
    "replicas_confirmed_at",
)


class ReceiptNotFound(LookupError):
    """No erasure request with that id."""


def _iso(ts: datetime | None) -> str | None:
    return audit.format_ts(ts) if ts is not None else None


def _version(session: Session, version_id: int | None) -> dict[str, Any] | None:
    if version_id is None:
        return None
    version = session.get(AdapterVersion, version_id)
    if version is None:  # pragma: no cover - foreign key
        return None
    return {
        "id": version.id,
        "version": version.version,
        "adapter_sha256": version.adapter_sha256,
        "manifest_digest": version.manifest_digest,
        "sample_digest": version.sample_digest,
        "state": version.state,
    }


def build_receipt(
    session: Session,
    request_id: str,
    signer: SigningKey,
    *,
    anchor: Any | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The signed receipt of an erasure request (ReceiptNotFound when unknown). `anchor`: the
    `apa.anchors.Anchor` covering the request's newest audit row (default: the registry's oldest
    recorded anchor that does; None in the receipt when there is none yet)."""
    from apa.anchors import covering_anchor

    request = session.get(ErasureRequest, request_id)
    if request is None:
        raise ReceiptNotFound(request_id)
    rows = audit.rows_for(session, request_ids=[request_id])
    last_row = rows[-1].id if rows else 0
    if anchor is None and rows:
        anchor = covering_anchor(session, last_row)
    links = session.scalars(
        select(ErasureRequestShard)
        .where(ErasureRequestShard.request_id == request_id)
        .order_by(ErasureRequestShard.shard_id)
    )
    meta = {row.key: row.value for row in session.scalars(select(RegistryMeta))}
    body = {
        "format": RECEIPT_FORMAT,
        "issued_at": audit.format_ts(now or datetime.now(UTC)),
        "issuer": {"registry_id": meta.get(audit.REGISTRY_ID, ""), "signing_key_id": signer.key_id},
        "request": {
            "request_id": request.request_id,
            "user_pid": request.user_pid,
            "scope": request.scope,
            "interaction_pids": request.interaction_pids,
            "status": request.status,
            "samples_erased": request.samples_erased,
        },
        "times": {name: _iso(getattr(request, name)) for name in TIMES},
        "adapters": [
            {
                "shard_id": link.shard_id,
                "excluded": _version(session, link.excluded_version_id),
                "retrained": _version(session, link.retrained_version_id),
                "retrained_at": _iso(link.retrained_at),
            }
            for link in links
        ],
        "audit": {
            "audit_key_id": meta.get(audit.AUDIT_KEY_ID),
            "pseudonym_key_id": meta.get("pseudonym_key_id"),
            "first_row": rows[0].id if rows else None,
            "last_row": last_row if rows else None,
            "rows": [
                {"id": r.id, "ts": audit.format_ts(r.ts), "event_type": r.event_type, "hash": r.hash}
                for r in rows
            ],
        },
        "anchor": anchor.to_json() if anchor is not None else None,
    }
    body = audit.json_roundtrip(body)
    return {"receipt": body, "signature": sign(body, signer)}


def sign(body: dict[str, Any], signer: SigningKey) -> dict[str, Any]:
    return {
        "alg": ALGORITHM,
        "key_id": signer.key_id,
        "public_key": signer.public.b64,
        "value": signer.sign(audit.canonical_json(body).encode("ascii")),
    }


@dataclass
class ReceiptCheck:
    """What `check_receipt` found: `ok` when every check passed."""

    checks: list[tuple[bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(passed for passed, _ in self.checks)

    def add(self, passed: bool, message: str) -> bool:
        self.checks.append((passed, message))
        return passed

    def lines(self) -> list[str]:
        verdict = "VALID" if self.ok else "INVALID"
        return [f"{'ok  ' if passed else 'FAIL'} {message}" for passed, message in self.checks] + [
            f"receipt {verdict}"
        ]


def check_receipt(document: object, public_key: PublicKey | None = None) -> ReceiptCheck:
    """Check a receipt offline (see the module docstring). `public_key`: the controller's published
    key; None uses the key embedded in the receipt (then compare its id with the published one)."""
    from apa.anchors import Anchor

    result = ReceiptCheck()
    if not isinstance(document, dict) or not isinstance(document.get("receipt"), dict):
        result.add(False, "not a receipt: expected an object with `receipt` and `signature`")
        return result
    body: dict[str, Any] = document["receipt"]
    signature = document.get("signature")
    if not result.add(body.get("format") == RECEIPT_FORMAT, f"format is {body.get('format')!r}"):
        return result
    if not isinstance(signature, dict) or signature.get("alg") != ALGORITHM:
        result.add(False, f"signature must be an {ALGORITHM} signature object")
        return result
    try:
        embedded = PublicKey.parse(str(signature.get("public_key", "")))
    except ValueError as exc:
        result.add(False, f"embedded public key: {exc}")
        return result
    if public_key is None:
        public_key = embedded
        result.add(
            True,
            f"using the public key embedded in the receipt, key id {embedded.key_id}: compare "
            "it with the key id the controller published",
        )
    elif not result.add(
        embedded.raw == public_key.raw, f"the receipt names the published key {public_key.key_id}"
    ):
        return result
    message = audit.canonical_json(body).encode("ascii")
    if not result.add(
        signature.get("key_id") == public_key.key_id
        and public_key.verify(message, str(signature.get("value", ""))),
        f"{ALGORITHM} signature of the receipt under key {public_key.key_id}",
    ):
        return result
    request = body.get("request") or {}
    trail = body.get("audit") or {}
    rows = trail.get("rows") or []
    result.add(
        bool(rows)
        and all(r.get("id") for r in rows)
        and [r["id"] for r in rows] == sorted({r["id"] for r in rows}),
        f"{len(rows)} audit rows about request {request.get('request_id')!r}, in order",
    )
    first, last = trail.get("first_row"), trail.get("last_row")
    result.add(
        bool(rows) and first == rows[0]["id"] and last == rows[-1]["id"],
        f"audit sequence range {first}..{last} matches the rows",
    )
    times = body.get("times") or {}
    order = [str(times[name]) for name in ("received_at", "excluded_at", "completed_at") if times.get(name)]
    result.add(order == sorted(order), "received <= excluded <= completed")
    shas = [
        v.get("adapter_sha256")
        for a in body.get("adapters") or []
        for v in (a.get("excluded"), a.get("retrained"))
        if isinstance(v, dict)
    ]
    result.add(
        all(s is None or (isinstance(s, str) and len(s) == 64) for s in shas),
        f"{len(shas)} adapter versions named with their weights' sha256",
    )
    if request.get("status") == "completed":
        result.add(
            all(isinstance(a.get("retrained"), dict) for a in body.get("adapters") or []),
            "completed: every affected shard names its retrained version",
        )
    raw_anchor = body.get("anchor")
    if raw_anchor is None:
        result.add(False, f"no anchor covers audit rows {first}..{last} yet: fetch the receipt again later")
        return result
    try:
        anchor = Anchor.from_json(raw_anchor)
    except ValueError as exc:
        result.add(False, f"anchor: {exc}")
        return result
    result.add(anchor.signature_ok(public_key), f"anchor {anchor.label} is signed by key {public_key.key_id}")
    result.add(
        isinstance(last, int) and anchor.sequence >= last,
        f"anchor of row {anchor.sequence} covers audit rows up to {last}",
    )
    result.add(
        anchor.registry_id == (body.get("issuer") or {}).get("registry_id")
        and anchor.audit_key_id == trail.get("audit_key_id"),
        "anchor names the same registry and audit key",
    )
    return result


__all__ = ["RECEIPT_FORMAT", "ReceiptCheck", "ReceiptNotFound", "build_receipt", "check_receipt", "sign"]
