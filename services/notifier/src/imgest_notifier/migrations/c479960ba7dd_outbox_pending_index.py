"""outbox pending index

Revision ID: c479960ba7dd
Revises: d91d0a9fdd3c
Create Date: 2026-11-28 18:23:19.679989
"""

from imgest_runtime.outbox import index_unsent_rows, unindex_unsent_rows

revision = 'c479960ba7dd'
down_revision = 'd91d0a9fdd3c'
branch_labels = None
depends_on = None


def upgrade() -> None:
    index_unsent_rows("notifier")


def downgrade() -> None:
    unindex_unsent_rows("notifier")
