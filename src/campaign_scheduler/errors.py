"""Errors that reach people. Each message says what is wrong and what to do about it."""

from __future__ import annotations


class SchedulerError(Exception):
    """Base class: a problem the caller can act on (never a bug in this package)."""


class ConfigError(SchedulerError):
    """A setting from the environment is missing or malformed."""


class InvalidInput(SchedulerError, ValueError):
    """A caller passed a value the scheduler cannot accept (naive datetime, bad id, ...)."""


class UnknownTimeZone(InvalidInput):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' or 'UTC'"
        )
        self.name = name


class NotFound(SchedulerError, LookupError):
    """A campaign, node or product user named by the caller does not exist."""


class StateConflict(SchedulerError):
    """The node is not in a state that allows the requested change."""


class BackendUnavailable(SchedulerError):
    """Redis or the database cannot be reached; nothing was lost, retry when it is back."""


class NonRetryableError(SchedulerError):
    """Raised by a node handler when retrying cannot help (e.g. an HTTP 4xx answer)."""
