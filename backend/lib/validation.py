"""Checks on user-supplied text that msgspec's types do not express: e-mails, slugs, time zones, control characters."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from zoneinfo import available_timezones

from email_validator import EmailNotValidError, validate_email

from backend.config import get_settings
from backend.lib.problems import InvalidInput

SLUG_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{1,38}[a-z0-9])$")
RESERVED_SLUGS = frozenset(
    {
        "www",
        "api",
        "app",
        "admin",
        "ops",
        "sip",
        "static",
        "assets",
        "status",
        "help",
        "support",
        "mail",
        "root",
    }
)


def clean_text(field: str, value: str, *, max_length: int, allow_empty: bool = False) -> str:
    """Trimmed, NFC-normalised text with no control characters; `InvalidInput` otherwise."""
    value = unicodedata.normalize("NFC", value).strip()
    if not value and not allow_empty:
        raise InvalidInput.field(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidInput.field(field, f"must be at most {max_length} characters")
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn"} for ch in value):
        raise InvalidInput.field(field, "must not contain control or unassigned characters")
    return value


def clean_email(field: str, value: str) -> str:
    """A syntactically valid e-mail address, normalised (no DNS look-up: nothing leaves the machine)."""
    if len(value) > 254:
        raise InvalidInput.field(field, "must be at most 254 characters")
    try:
        return validate_email(
            value.strip(),
            check_deliverability=False,
            allow_smtputf8=True,
            # `.test` addresses (RFC 2606) are accepted outside production, for demos and tests.
            test_environment=get_settings().environment != "production",
        ).normalized
    except EmailNotValidError as exc:
        raise InvalidInput.field(field, f"is not a valid e-mail address ({exc})") from exc


def clean_slug(field: str, value: str) -> str:
    """A workspace slug: 3 to 40 of a-z, 0-9 and inner hyphens, not reserved."""
    if not SLUG_PATTERN.fullmatch(value):
        raise InvalidInput.field(
            field, "must be 3-40 characters of a-z, 0-9 and hyphens, not starting or ending with one"
        )
    if value in RESERVED_SLUGS:
        raise InvalidInput.field(field, "is reserved")
    return value


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def clean_time_zone(field: str, value: str) -> str:
    """An IANA time-zone name such as `Asia/Shanghai`."""
    if value not in _zones():
        raise InvalidInput.field(field, "is not a known IANA time zone (for example Europe/Paris)")
    return value
