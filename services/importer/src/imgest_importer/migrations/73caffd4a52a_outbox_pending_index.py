"""outbox pending index

Revision ID: 73caffd4a52a
Revises: 3481bb94d8fc
Create Date: 2026-11-28 18:23:15.880178
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '73caffd4a52a'
down_revision = '3481bb94d8fc'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Concurrently: a long-running deployment's outbox is big, and is written all the time.
    with op.get_context().autocommit_block():
        op.drop_index(op.f('ix_importer_outbox_published_at'), table_name='outbox', schema='importer', postgresql_concurrently=True)
        op.create_index('outbox_pending', 'outbox', ['seq'], unique=False, schema='importer', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index('outbox_pending', table_name='outbox', schema='importer', postgresql_where=sa.text('published_at IS NULL'), postgresql_concurrently=True)
        op.create_index(op.f('ix_importer_outbox_published_at'), 'outbox', ['published_at'], unique=False, schema='importer', postgresql_concurrently=True)
