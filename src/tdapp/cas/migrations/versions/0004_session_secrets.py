"""Secret values the CAS made or was given for a session, sealed apart from its document.

A session's generated secrets are not part of its document (readers never see
them, the hash does not cover them), so they get their own sealed column,
bound to the session's name, creator and hash (:mod:`tdapp.cas.secret_store`).
Sessions stored before this revision have none, which is right: sessions with
secrets were refused before it.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("sealed_secrets", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    op.drop_column("sessions", "sealed_secrets")
