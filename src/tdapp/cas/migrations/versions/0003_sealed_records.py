"""Sealed volume tags and instances: a version per tag and a MAC per row.

Rows stored before this revision get version 0 and no MAC. The migration cannot
make MACs (it has no master key), and the CAS does not make them later either:
a MAC made for a row it did not write itself would bless whatever a database
writer had put there. Such rows are refused with their reason; see docs/cas.md.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("volume_tags", sa.Column("version", sa.Integer, nullable=False,
                                           server_default="0"))
    op.add_column("volume_tags", sa.Column("mac", sa.String(64), nullable=True))
    op.add_column("instances", sa.Column("mac", sa.String(64), nullable=True))


def downgrade() -> None:
    op.drop_column("instances", "mac")
    op.drop_column("volume_tags", "mac")
    op.drop_column("volume_tags", "version")
