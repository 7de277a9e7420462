"""outbox pending index

Revision ID: 7782e7690d64
Revises: c450005b438b
Create Date: 2026-11-28 18:23:12.170206
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '7782e7690d64'
down_revision = 'c450005b438b'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Concurrently: a long-running deployment's outbox is big, and is written all the time.
    with op.get_context().autocommit_block():
        op.drop_index(op.f('ix_metadata_outbox_published_at'), table_name='outbox', schema='metadata', postgresql_concurrently=True)
        op.create_index('outbox_pending', 'outbox', ['seq'], unique=False, schema='metadata', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('outbox_pending', table_name='outbox', schema='metadata', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)
        op.create_index(op.f('ix_metadata_outbox_published_at'), 'outbox', ['published_at'], unique=False, schema='metadata', postgresql_concurrently=True)
