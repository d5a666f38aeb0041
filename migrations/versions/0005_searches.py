"""accuracy-aware searches, and the search a job is a trial of

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 02:00:00
"""
from alembic import op
import sqlalchemy as sa
import app.models.base


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('searches',
    sa.Column('name', sa.String(length=255), nullable=True),
    sa.Column('model_id', sa.String(length=36), nullable=False),
    sa.Column('status', sa.Enum('queued', 'running', 'succeeded', 'failed', 'canceled', name='jobstatus', native_enum=False, length=16), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('spec_hash', sa.String(length=64), nullable=False),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('progress', sa.JSON(), nullable=False),
    sa.Column('state', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('error', sa.JSON(), nullable=True),
    sa.Column('started_at', app.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', app.models.base.UTCDateTime(timezone=True), nullable=True),
    sa.Column('revision', sa.Integer(), server_default='1', nullable=False),
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('created_at', app.models.base.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_searches_model_id_models'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_searches')),
    sa.UniqueConstraint('tenant', 'idempotency_key', name=op.f('uq_searches_tenant'))
    )
    with op.batch_alter_table('searches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_searches_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_searches_model_id'), ['model_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_searches_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_searches_tenant'), ['tenant'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('search_id', sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_search_id'), ['search_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_jobs_search_id_searches'), 'searches', ['search_id'], ['id'], ondelete='RESTRICT')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_search_id_searches'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_search_id'))
        batch_op.drop_column('search_id')

    with op.batch_alter_table('searches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_searches_tenant'))
        batch_op.drop_index(batch_op.f('ix_searches_status'))
        batch_op.drop_index(batch_op.f('ix_searches_model_id'))
        batch_op.drop_index(batch_op.f('ix_searches_created_at'))

    op.drop_table('searches')
