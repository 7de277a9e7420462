"""outbox pending index

Revision ID: b53c4cac99ed
Revises: d5a7e2c91b04
Create Date: 2026-11-28 18:23:05.297566
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = 'b53c4cac99ed'
down_revision = 'd5a7e2c91b04'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Concurrently: a long-running deployment's outbox is big, and is written all the time.
    with op.get_context().autocommit_block():
        op.drop_index(op.f('ix_gateway_outbox_published_at'), table_name='outbox', schema='gateway', postgresql_concurrently=True)
        op.create_index('outbox_pending', 'outbox', ['seq'], unique=False, schema='gateway', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('outbox_pending', table_name='outbox', schema='gateway', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)
        op.create_index(op.f('ix_gateway_outbox_published_at'), 'outbox', ['published_at'], unique=False, schema='gateway', postgresql_concurrently=True)
