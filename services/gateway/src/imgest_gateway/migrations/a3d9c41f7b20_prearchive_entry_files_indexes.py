"""prearchive entry files indexes

Revision ID: a3d9c41f7b20
Revises: 5e1f0c2a9d47
Create Date: 2026-11-28 08:50:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = 'a3d9c41f7b20'
down_revision = '5e1f0c2a9d47'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('upload_file_prearchived_session', 'upload_file', ['session'], unique=False, schema='gateway', postgresql_where=sa.text("state = 'prearchived'"))
    op.create_index(op.f('ix_gateway_prearchive_entry_uri'), 'prearchive_entry', ['uri'], unique=False, schema='gateway')


def downgrade() -> None:
    op.drop_index(op.f('ix_gateway_prearchive_entry_uri'), table_name='prearchive_entry', schema='gateway')
    op.drop_index('upload_file_prearchived_session', table_name='upload_file', schema='gateway', postgresql_where=sa.text("state = 'prearchived'"))
