"""a job's ONNX artifact (issue 15)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 02:40:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('onnx_sha256', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('onnx_size_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('onnx_size_bytes')
        batch_op.drop_column('onnx_sha256')
