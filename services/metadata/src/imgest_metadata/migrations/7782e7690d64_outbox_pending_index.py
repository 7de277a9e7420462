"""outbox pending index

Revision ID: 7782e7690d64
Revises: c450005b438b
Create Date: 2026-11-28 18:23:12.170206
"""

from imgest_runtime.outbox import index_unsent_rows, unindex_unsent_rows

revision = '7782e7690d64'
down_revision = 'c450005b438b'
branch_labels = None
depends_on = None


def upgrade() -> None:
    index_unsent_rows("metadata")


def downgrade() -> None:
    unindex_unsent_rows("metadata")
