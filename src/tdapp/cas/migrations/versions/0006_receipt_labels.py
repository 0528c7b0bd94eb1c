"""Receipts of pool tasks: the task's label and the output's URL, to answer a redelivery.

A worker pool may deliver a task twice; the second delivery asks the CAS whether
a run of the same task (its label) committed already, and reports that run's
receipt and URL instead of running again.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("receipts", sa.Column("label", sa.String(128), nullable=True))
    op.add_column("receipts", sa.Column("url", sa.Text, nullable=True))
    op.create_index("ix_receipts_session_label", "receipts", ["session", "label"])


def downgrade() -> None:
    op.drop_index("ix_receipts_session_label", "receipts")
    op.drop_column("receipts", "url")
    op.drop_column("receipts", "label")
