"""outbox pending index

Revision ID: c479960ba7dd
Revises: d91d0a9fdd3c
Create Date: 2026-11-28 18:23:19.679989
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = 'c479960ba7dd'
down_revision = 'd91d0a9fdd3c'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Concurrently: a long-running deployment's outbox is big, and is written all the time.
    with op.get_context().autocommit_block():
        op.drop_index(op.f('ix_notifier_outbox_published_at'), table_name='outbox', schema='notifier', postgresql_concurrently=True)
        op.create_index('outbox_pending', 'outbox', ['seq'], unique=False, schema='notifier', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('outbox_pending', table_name='outbox', schema='notifier', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)
        op.create_index(op.f('ix_notifier_outbox_published_at'), 'outbox', ['published_at'], unique=False, schema='notifier', postgresql_concurrently=True)
