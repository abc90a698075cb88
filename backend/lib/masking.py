"""Phone numbers and e-mail addresses as someone without `customers:read_sensitive` sees them.

The customer store masks its records with these, and every other domain that shows a customer's
address (an interaction's caller, a callback number) masks it the same way.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

READ_SENSITIVE = "customers:read_sensitive"
"""The permission that shows phone numbers and e-mail addresses unmasked."""
MASK = "*"
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


@lru_cache(maxsize=4096)
def mask_phone(value: str) -> str:
    """`+8613800138000` -> `+86 138****8000`: country code, first three and last four digits stay."""
    if _E164.match(value):
        try:
            parsed = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException:
            parsed = None
        if parsed is not None:
            national = phonenumbers.national_significant_number(parsed)
            if len(national) > 7:
                middle = len(national) - 7
                return f"+{parsed.country_code} {national[:3]}{MASK * middle}{national[-4:]}"
            return f"+{parsed.country_code} {MASK * max(0, len(national) - 2)}{national[-2:]}"
    shown = 4 if len(value) > 6 else 2
    return MASK * max(0, len(value) - shown) + value[-shown:]


def mask_email(value: str) -> str:
    """`wang.li@example.com` -> `w***@example.com`."""
    local, at, domain = value.partition("@")
    if not at:
        return mask_text(value)
    return f"{local[:1]}***@{domain}"


def mask_text(value: str) -> str:
    """Any other sensitive value: its last two characters at most."""
    if len(value) <= 2:
        return MASK * len(value)
    return MASK * min(8, len(value) - 2) + value[-2:]


def mask_address(ref: str) -> str:
    """An interaction's customer address (a caller id or an e-mail), masked; customer ids are left alone."""
    if "@" in ref:
        return mask_email(ref)
    if _E164.match(ref) or (ref.replace("+", "").isdigit() and len(ref) >= 5):
        return mask_phone(ref)
    return ref
