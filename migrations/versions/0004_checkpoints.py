"""stored outputs of completed steps (job_checkpoints)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 02:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import app.models.base


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_checkpoints',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('model_id', sa.String(length=36), nullable=False),
    sa.Column('step_index', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('stage', sa.JSON(), nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('created_at', app.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_checkpoints_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_job_checkpoints_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_checkpoints'))
    )
    with op.batch_alter_table('job_checkpoints', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_checkpoints_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_checkpoints_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_checkpoints_key'), ['key'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_checkpoints_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_checkpoints_sha256'), ['sha256'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_checkpoints_tenant'), ['tenant'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_checkpoints', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_checkpoints_tenant'))
        batch_op.drop_index(batch_op.f('ix_job_checkpoints_sha256'))
        batch_op.drop_index(batch_op.f('ix_job_checkpoints_model_id'))
        batch_op.drop_index(batch_op.f('ix_job_checkpoints_key'))
        batch_op.drop_index(batch_op.f('ix_job_checkpoints_job_id'))
        batch_op.drop_index(batch_op.f('ix_job_checkpoints_created_at'))

    op.drop_table('job_checkpoints')
