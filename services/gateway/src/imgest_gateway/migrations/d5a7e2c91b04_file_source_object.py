"""the stored object each file came from

Revision ID: d5a7e2c91b04
Revises: a3d9c41f7b20
Create Date: 2026-11-28 15:50:00.000000
"""

import sqlalchemy as sa
from alembic import op


revision = 'd5a7e2c91b04'
down_revision = 'a3d9c41f7b20'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('upload_file', sa.Column('source_key', sa.String(length=1024), nullable=True), schema='gateway')


def downgrade() -> None:
    op.drop_column('upload_file', 'source_key', schema='gateway')
