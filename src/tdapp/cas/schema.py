"""The CAS database tables (SQLAlchemy Core). Changes go through an Alembic migration."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

sessions = Table(
    "sessions", metadata,
    Column("name", String(128), primary_key=True),
    Column("hash", String(64), nullable=False),
    Column("creator", String(64), nullable=False),
    Column("revision", Integer, nullable=False),
    Column("sealed_document", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # Migration 0004: the session's secret values, sealed to its name, creator and hash.
    Column("sealed_secrets", LargeBinary, nullable=True),
)

volume_tags = Table(
    "volume_tags", metadata,
    Column("session", String(128), primary_key=True),
    Column("volume", String(128), primary_key=True),
    Column("tag", String(32), nullable=True),
    Column("updated_at", Float, nullable=False),
    # Sealed tags (migration 0003): the version grows by one with each accepted change,
    # the MAC binds session, volume, tag and version to the master key (cas.records).
    Column("version", Integer, nullable=False, server_default="0"),
    Column("mac", String(64), nullable=True),
)

audit_log = Table(
    "audit_log", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("at", Float, nullable=False),
    Column("session", String(128), nullable=True, index=True),
    Column("event", String(64), nullable=False),
    Column("actor", String(64), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text, nullable=False),
)

nonces = Table(
    "nonces", metadata,
    Column("nonce", String(64), primary_key=True),
    Column("session", String(128), nullable=False),
    Column("service", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
)

instances = Table(
    "instances", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("session", String(128), nullable=False),
    Column("service", String(128), nullable=False),
    Column("measurement", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("mac", String(64), nullable=True),
    # Migration 0005: what a receipt states about the instance (JSON; covered by the MAC).
    Column("details", Text, nullable=True),
)

receipts = Table(
    "receipts", metadata,
    # One receipt per instance: committing its outputs happens once.
    Column("token_hash", String(64), primary_key=True),
    Column("session", String(128), nullable=False, index=True),
    Column("bundle_sha256", String(64), nullable=True),
    Column("receipt", Text, nullable=False),  # the signed JWS: its signature is its integrity
    Column("created_at", Float, nullable=False),
    # Migration 0006: a pool task's label (also in the signed receipt) and the output's URL.
    Column("label", String(128), nullable=True),
    Column("url", Text, nullable=True),
    Index("ix_receipts_session_label", "session", "label"),
)
