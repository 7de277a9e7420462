"""outbox pending index

Revision ID: 414af935312c
Revises: 0c0ea47f1b18
Create Date: 2026-11-28 18:23:08.821896
"""

from imgest_runtime.outbox import index_unsent_rows, unindex_unsent_rows

revision = '414af935312c'
down_revision = '0c0ea47f1b18'
branch_labels = None
depends_on = None


def upgrade() -> None:
    index_unsent_rows("unpacker")


def downgrade() -> None:
    unindex_unsent_rows("unpacker")
