"""outbox pending index

Revision ID: 73caffd4a52a
Revises: 3481bb94d8fc
Create Date: 2026-11-28 18:23:15.880178
"""

from imgest_runtime.outbox import index_unsent_rows, unindex_unsent_rows

revision = '73caffd4a52a'
down_revision = '3481bb94d8fc'
branch_labels = None
depends_on = None


def upgrade() -> None:
    index_unsent_rows("importer")


def downgrade() -> None:
    unindex_unsent_rows("importer")
