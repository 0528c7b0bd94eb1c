"""Receipts: what an instance was released (for its receipt), and the receipts signed.

``instances.details`` holds what the CAS will state in the instance's receipt
(session hash, TEE, platform, evidence digest, the input tags), covered by the
instance's MAC; rows written before this revision have none and get no
receipt. ``receipts`` keeps each signed receipt, one per instance.

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("details", sa.Text, nullable=True))
    op.create_table(
        "receipts",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("session", sa.String(128), nullable=False, index=True),
        sa.Column("bundle_sha256", sa.String(64), nullable=True),
        sa.Column("receipt", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("receipts")
    op.drop_column("instances", "details")
