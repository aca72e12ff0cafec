"""Tables of the durable state store, and engines for SQLite and PostgreSQL.

The database is the source of truth for node state and its whole history; Redis only holds
timers. Every instant is stored as UTC and read back timezone-aware.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from .timewindows import utcnow


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no offset, so we store UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime reached the database layer")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


BigId = BigInteger().with_variant(Integer, "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default="PENDING")
    user_id: Mapped[str] = mapped_column(String(100), index=True)  # owning account (tenant)
    timezone: Mapped[str | None] = mapped_column(String(64))  # fallback for product users
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    launched_at: Mapped[datetime | None]
    stopped_at: Mapped[datetime | None]


class CampaignNode(Base):
    __tablename__ = "campaign_nodes"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)


class CampaignEdge(Base):
    __tablename__ = "campaign_edges"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    from_id: Mapped[str] = mapped_column(ForeignKey("campaign_nodes.id"))
    to_id: Mapped[str] = mapped_column(ForeignKey("campaign_nodes.id"))
    edge_kind: Mapped[str] = mapped_column(String(16), default="Default")


class ProductUser(Base):
    __tablename__ = "product_users"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(100), index=True)
    external_id: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    traits: Mapped[dict[str, Any]] = mapped_column(default=dict)
    timezone: Mapped[str | None] = mapped_column(String(64))  # IANA name
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class NodeStateRow(Base):
    """One visit of a product user to a campaign node."""

    __tablename__ = "node_states"
    __table_args__ = (
        UniqueConstraint("campaign_id", "node_id", "product_user_id", name="uq_node_visit"),
        Index("ix_node_states_state_run_at", "state", "run_at"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("campaign_nodes.id"))
    product_user_id: Mapped[str] = mapped_column(ForeignKey("product_users.id"), index=True)
    user_id: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(default=0)
    did_timeout: Mapped[bool] = mapped_column(Boolean, default=False)
    run_at: Mapped[datetime | None]
    timeout_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    job_id: Mapped[str | None] = mapped_column(String(400))
    timeout_job_id: Mapped[str | None] = mapped_column(String(400))
    run_token: Mapped[str | None] = mapped_column(String(200))  # lock token of the live attempt
    last_error_type: Mapped[str | None] = mapped_column(String(200))
    last_error: Mapped[str | None] = mapped_column(Text)
    # What a handler delivered (e.g. the Message-ID of a sent email), written in the same
    # transaction as the attempt's progress so a retry can see it and not deliver twice.
    delivered_at: Mapped[datetime | None]
    delivery: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class CampaignEntry(Base):
    """A product user entered a campaign. The constraint makes "at most once" a fact."""

    __tablename__ = "campaign_entries"
    __table_args__ = (UniqueConstraint("campaign_id", "product_user_id", name="uq_entry"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    campaign_id: Mapped[str] = mapped_column(ForeignKey("campaigns.id"), index=True)
    product_user_id: Mapped[str] = mapped_column(ForeignKey("product_users.id"))
    entry_node_id: Mapped[str] = mapped_column(String(100))
    entered_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Something a product user did, as reported by the product."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_user_name_at", "product_user_id", "name", "occurred_at"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    product_user_id: Mapped[str] = mapped_column(ForeignKey("product_users.id"))
    name: Mapped[str] = mapped_column(String(200))
    properties: Mapped[dict[str, Any]] = mapped_column(default=dict)
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeTransition(Base):
    """Append-only audit trail: one row per state change of a node visit."""

    __tablename__ = "node_transitions"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node_state_id: Mapped[int] = mapped_column(ForeignKey("node_states.id"), index=True)
    campaign_id: Mapped[str] = mapped_column(String(100), index=True)
    node_id: Mapped[str] = mapped_column(String(100))
    product_user_id: Mapped[str] = mapped_column(String(100), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    attempt: Mapped[int] = mapped_column(default=0)
    reason: Mapped[str] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    job_id: Mapped[str | None] = mapped_column(String(400))
    error_type: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(Text)


# ---- engines -----------------------------------------------------------------------------


def async_url(url: str) -> str:
    """The URL with the asyncio driver this package uses (aiosqlite / psycopg 3)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return str(u.set(drivername="sqlite+aiosqlite"))
    return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def sync_url(url: str) -> str:
    """The URL with a synchronous driver, for Alembic."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return str(u.set(drivername="sqlite"))
    return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def describe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_path(url: str) -> Path | None:
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return Path(u.database)
    return None


def configure_sqlite(sync_engine: Any, *, writer: bool = True) -> None:
    """WAL and a busy timeout let several worker processes share one file. A writer's
    BEGIN IMMEDIATE takes the write lock up front, so a read-then-write transaction never hits
    SQLITE_BUSY on lock upgrade (which the busy timeout does not cover); readers use a plain
    BEGIN and, under WAL, never wait for the writer."""

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def make_engine(url: str, *, writer: bool = True) -> AsyncEngine:
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(async_url(url), connect_args={"timeout": 30})
        configure_sqlite(engine.sync_engine, writer=writer)
        return engine
    return create_async_engine(async_url(url), pool_pre_ping=True, pool_size=10, max_overflow=10)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)
