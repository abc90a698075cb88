"""Phone numbers in international form: the one place `phonenumbers` decides what is a valid number."""

from __future__ import annotations

import phonenumbers


def valid_international(candidate: str) -> phonenumbers.PhoneNumber | None:
    """The number `candidate` (written with its `+`) if `phonenumbers` knows it as valid, else None."""
    try:
        parsed = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException:
        return None
    return parsed if phonenumbers.is_valid_number(parsed) else None


def as_e164(number: phonenumbers.PhoneNumber) -> str:
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
