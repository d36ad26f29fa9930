"""Item catalogue: the data set's item ids and their titles, per model (filled by `apa bootstrap`).

The inference service turns the item ids of `POST /recommend` into the titles of TALLRec prompts.
Items are not personal data: the table holds no user, sample or interaction id.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = 128


def upgrade() -> None:
    op.create_table(
        "item_catalogue",
        sa.Column(
            "model_id",
            sa.String(ID),
            sa.ForeignKey("models.id", name="fk_item_catalogue_model_id_models"),
            nullable=False,
        ),
        sa.Column("item_id", sa.String(ID), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("model_id", "item_id", name="pk_item_catalogue"),
    )


def downgrade() -> None:
    op.drop_table("item_catalogue")
