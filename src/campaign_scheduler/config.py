"""Settings from the environment, validated once at start-up.

The variable names of the specification (REDIS_HOST, REDIS_PORT, ...) are kept as they are;
the scheduler's own knobs start with SCHEDULER_.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError
from .timewindows import BusinessHours, parse_days, parse_hhmm, resolve_zone

DEFAULT_DATA_DIR = "campaign-data"

# How each setting is explained when it is wrong: (variable, what a good value looks like).
_HINTS: dict[str, tuple[str, str]] = {
    "redis_url": ("REDIS_URL", "a URL such as redis://127.0.0.1:6379/0 or rediss://host:6380/0"),
    "redis_host": ("REDIS_HOST", "a host name such as 127.0.0.1"),
    "redis_port": ("REDIS_PORT", "a port number from 1 to 65535, such as 6379"),
    "redis_password": ("REDIS_PASSWORD", "the password, or leave it unset"),
    "redis_db": ("REDIS_DB", "a database number from 0 to 15"),
    "database_url": (
        "DATABASE_URL",
        "sqlite:///path/to/file.db or postgresql://user@host:5432/dbname",
    ),
    "queue_prefix": ("SCHEDULER_QUEUE_PREFIX", "letters, digits, '_', '-', '{' or '}' only"),
    "concurrency": ("SCHEDULER_CONCURRENCY", "a whole number from 1 to 1000, such as 10"),
    "lock_duration_ms": ("SCHEDULER_LOCK_DURATION_MS", "milliseconds, at least 1000"),
    "stalled_interval_ms": ("SCHEDULER_STALLED_INTERVAL_MS", "milliseconds, at least 1000"),
    "reconcile_every_ms": ("SCHEDULER_RECONCILE_EVERY_MS", "milliseconds, at least 1000"),
    "reconcile_grace_ms": ("SCHEDULER_RECONCILE_GRACE_MS", "milliseconds, at least 0"),
    "keep_completed_s": ("SCHEDULER_KEEP_COMPLETED_S", "seconds, at least 0"),
    "keep_failed_s": ("SCHEDULER_KEEP_FAILED_S", "seconds, at least 0"),
    "default_timezone": ("SCHEDULER_DEFAULT_TIMEZONE", "an IANA time zone such as Europe/Paris"),
    "business_days": ("SCHEDULER_BUSINESS_DAYS", "days such as mon-fri or mon,tue,wed"),
    "business_start": ("SCHEDULER_BUSINESS_START", "a local time HH:MM such as 09:00"),
    "business_end": ("SCHEDULER_BUSINESS_END", "a local time HH:MM after the start, e.g. 17:00"),
    "holiday_country": ("SCHEDULER_HOLIDAY_COUNTRY", "an ISO country code such as US or FR"),
    "data_dir": ("SCHEDULER_DATA_DIR", "a writable folder"),
    "log_level": ("SCHEDULER_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR"),
    "smtp_host": ("SMTP_HOST", "the mail server's host name"),
    "smtp_port": ("SMTP_PORT", "a port number such as 25, 465, 587 or 1025"),
    "smtp_tls": ("SMTP_TLS", "true or false"),
    "smtp_starttls": ("SMTP_STARTTLS", "true or false"),
    "smtp_timeout_s": ("SMTP_TIMEOUT_S", "seconds, more than 0"),
    "email_from": ("EMAIL_FROM", "an address such as news@example.com"),
    "message_id_domain": ("MESSAGE_ID_DOMAIN", "a domain name such as example.com"),
    "api_port": ("API_PORT", "a port number such as 8000"),
    "metrics_port": ("SCHEDULER_METRICS_PORT", "a port number such as 9100, or 0 for none"),
    "handler_modules": ("SCHEDULER_HANDLER_MODULES", "comma-separated importable module names"),
}

_BY_VAR = {var: (var, good) for var, good in _HINTS.values()}


def _env(name: str) -> Any:
    return Field(None, validation_alias=AliasChoices(name, name.lower()))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    redis_url: str | None = _env("REDIS_URL")
    redis_host: str | None = _env("REDIS_HOST")
    redis_port: int = Field(6379, ge=1, le=65535, validation_alias=AliasChoices("REDIS_PORT"))
    redis_password: str | None = _env("REDIS_PASSWORD")
    redis_db: int = Field(0, ge=0, le=15, validation_alias=AliasChoices("REDIS_DB"))
    database_url: str | None = _env("DATABASE_URL")
    queue_prefix: str = Field(
        "bull", pattern=r"^[A-Za-z0-9_{}-]+$", validation_alias="SCHEDULER_QUEUE_PREFIX"
    )
    concurrency: int = Field(10, ge=1, le=1000, validation_alias="SCHEDULER_CONCURRENCY")
    # 5 s / 5 s lets a second worker pick up a killed worker's job in about 10 s (notes, 9).
    lock_duration_ms: int = Field(5000, ge=1000, validation_alias="SCHEDULER_LOCK_DURATION_MS")
    stalled_interval_ms: int = Field(
        5000, ge=1000, validation_alias="SCHEDULER_STALLED_INTERVAL_MS"
    )
    reconcile_every_ms: int = Field(30000, ge=1000, validation_alias="SCHEDULER_RECONCILE_EVERY_MS")
    reconcile_grace_ms: int = Field(30000, ge=0, validation_alias="SCHEDULER_RECONCILE_GRACE_MS")
    keep_completed_s: int = Field(86400, ge=0, validation_alias="SCHEDULER_KEEP_COMPLETED_S")
    keep_failed_s: int = Field(7 * 86400, ge=0, validation_alias="SCHEDULER_KEEP_FAILED_S")
    default_timezone: str = Field("UTC", validation_alias="SCHEDULER_DEFAULT_TIMEZONE")
    business_days: str = Field("mon-fri", validation_alias="SCHEDULER_BUSINESS_DAYS")
    business_start: str = Field("09:00", validation_alias="SCHEDULER_BUSINESS_START")
    business_end: str = Field("17:00", validation_alias="SCHEDULER_BUSINESS_END")
    holiday_country: str | None = Field(None, validation_alias="SCHEDULER_HOLIDAY_COUNTRY")
    data_dir: Path = Field(Path(DEFAULT_DATA_DIR), validation_alias="SCHEDULER_DATA_DIR")
    log_level: str = Field("INFO", validation_alias="SCHEDULER_LOG_LEVEL")
    smtp_host: str = Field("127.0.0.1", validation_alias="SMTP_HOST")
    smtp_port: int = Field(1025, ge=1, le=65535, validation_alias="SMTP_PORT")
    smtp_username: str | None = Field(None, validation_alias="SMTP_USERNAME")
    smtp_password: str | None = Field(None, validation_alias="SMTP_PASSWORD")
    smtp_tls: bool = Field(False, validation_alias="SMTP_TLS")  # implicit TLS (port 465)
    smtp_starttls: bool = Field(False, validation_alias="SMTP_STARTTLS")
    smtp_timeout_s: float = Field(30, gt=0, validation_alias="SMTP_TIMEOUT_S")
    email_from: str = Field("campaigns@localhost", validation_alias="EMAIL_FROM")
    message_id_domain: str = Field("campaign-scheduler.local", validation_alias="MESSAGE_ID_DOMAIN")
    api_token: str | None = Field(None, validation_alias="API_TOKEN")
    api_host: str = Field("127.0.0.1", validation_alias="API_HOST")
    api_port: int = Field(8000, ge=0, le=65535, validation_alias="API_PORT")
    # A worker process serves its own job metrics here (0: not served).
    metrics_port: int = Field(0, ge=0, le=65535, validation_alias="SCHEDULER_METRICS_PORT")
    # Modules with a `register(registry)` function that adds node handlers by kind.
    handler_modules: str = Field("", validation_alias="SCHEDULER_HANDLER_MODULES")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("scheme must be redis://, rediss:// or unix://")
        return v

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str | None) -> str | None:
        if v is not None and not v.split(":", 1)[0].startswith(("sqlite", "postgresql")):
            raise ValueError("only SQLite and PostgreSQL are supported")
        return v

    @field_validator("default_timezone")
    @classmethod
    def _check_zone(cls, v: str) -> str:
        resolve_zone(v)
        return v

    @field_validator("business_days")
    @classmethod
    def _check_days(cls, v: str) -> str:
        parse_days(v)
        return v

    @field_validator("business_start", "business_end")
    @classmethod
    def _check_hhmm(cls, v: str) -> str:
        parse_hhmm(v)
        return v

    @field_validator("holiday_country")
    @classmethod
    def _check_country(cls, v: str | None) -> str | None:
        if v:
            import holidays

            if v.upper() not in holidays.list_supported_countries():
                raise ValueError(f"no public-holiday calendar for country {v!r}")
            return v.upper()
        return None

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, v: str) -> str:
        if v.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("unknown log level")
        return v.upper()

    # ---- derived values -------------------------------------------------------------

    @property
    def redis_configured(self) -> bool:
        return bool(self.redis_url or self.redis_host)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'campaign-scheduler.db').resolve()}"

    def business_hours(self) -> BusinessHours:
        start, end = parse_hhmm(self.business_start), parse_hhmm(self.business_end)
        if end <= start:
            raise ConfigError(
                f"SCHEDULER_BUSINESS_END={self.business_end!r} is not after "
                f"SCHEDULER_BUSINESS_START={self.business_start!r}: set an end later in the day"
            )
        return BusinessHours(
            days=parse_days(self.business_days),
            start=start,
            end=end,
            holiday_country=self.holiday_country,
        )


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus explicit overrides); raise ConfigError naming the variable."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            var, good = _HINTS.get(field) or _BY_VAR.get(field.upper(), (field, "a valid value"))
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(f"{var}={err.get('input')!r} is invalid ({msg}); set it to {good}")
        raise ConfigError("; ".join(problems)) from None
    settings.business_hours()  # cross-field check (start before end)
    return settings
