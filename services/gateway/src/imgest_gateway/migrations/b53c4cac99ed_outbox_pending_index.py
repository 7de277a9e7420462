"""outbox pending index

Revision ID: b53c4cac99ed
Revises: d5a7e2c91b04
Create Date: 2026-11-28 18:23:05.297566
"""

from imgest_runtime.outbox import index_unsent_rows, unindex_unsent_rows

revision = 'b53c4cac99ed'
down_revision = 'd5a7e2c91b04'
branch_labels = None
depends_on = None


def upgrade() -> None:
    index_unsent_rows("gateway")


def downgrade() -> None:
    unindex_unsent_rows("gateway")
