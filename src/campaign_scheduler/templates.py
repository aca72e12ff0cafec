"""Email templates, rendered in Jinja's immutable sandbox: a template sees the user's and the
campaign's fields and nothing else - no Python attributes, no files, no imports."""

from __future__ import annotations

from typing import Any

from jinja2 import ChainableUndefined, TemplateError, Undefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import NonRetryableError


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox quietly renders a blocked attribute as empty; we refuse the template,
    so an attempt to reach Python internals is seen, not silently sent."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__} is not allowed"
        )


# Missing fields render empty (a user without a first name still gets the email).
_TEXT = _Sandbox(undefined=ChainableUndefined, autoescape=False)
_HTML = _Sandbox(undefined=ChainableUndefined, autoescape=True)


def render(template: str, context: dict[str, Any], *, html: bool = False) -> str:
    """Render; a broken or malicious template is a NonRetryableError (retrying cannot fix it)."""
    env = _HTML if html else _TEXT
    try:
        return env.from_string(template).render(context)
    # SecurityError and syntax errors are TemplateErrors; anything else (an {% include %}
    # with no loader, a filter on the wrong type) is just as deterministic: retrying won't help.
    except (TemplateError, TypeError, ValueError, AttributeError, LookupError) as exc:
        raise NonRetryableError(
            f"template cannot be rendered: {type(exc).__name__}: {exc}"
        ) from exc
