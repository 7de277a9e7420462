"""outbox pending index

Revision ID: 414af935312c
Revises: 0c0ea47f1b18
Create Date: 2026-11-28 18:23:08.821896
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '414af935312c'
down_revision = '0c0ea47f1b18'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Concurrently: a long-running deployment's outbox is big, and is written all the time.
    with op.get_context().autocommit_block():
        op.drop_index(op.f('ix_unpacker_outbox_published_at'), table_name='outbox', schema='unpacker', postgresql_concurrently=True)
        op.create_index('outbox_pending', 'outbox', ['seq'], unique=False, schema='unpacker', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('outbox_pending', table_name='outbox', schema='unpacker', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)
        op.create_index(op.f('ix_unpacker_outbox_published_at'), 'outbox', ['published_at'], unique=False, schema='unpacker', postgresql_concurrently=True)
