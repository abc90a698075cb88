"""Contact points in one canonical form, and masked for those who may not see them.

Phone numbers become E.164 with `phonenumbers`, local numbers read in the
tenant's default region. A number that cannot be parsed is never an error: it
is kept as entered, flagged invalid, and still matched by its digits.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

from backend.config import get_settings
from backend.lib.masking import mask_email, mask_phone

_NOT_DIALLED = re.compile(r"[^0-9+]")


@dataclass(frozen=True, slots=True)
class Phone:
    """A phone number: `value` is what lookups match (E.164 when valid), `raw` what was entered."""

    value: str
    raw: str
    valid: bool


def normalise_phone(raw: str, region: str | None) -> Phone:
    """E.164 if `raw` is a valid number (international, or local to `region`); else its dialled characters, flagged.

    Accepts the formats people type and caller ids arrive in: `+86 138 0013 8000`,
    `(0)138-0013-8000`, `0086 13800138000`, `tel:+8613800138000`.
    """
    text = raw.strip()
    candidate = unicodedata.normalize("NFKC", text).removeprefix("tel:").strip()
    if candidate.startswith("00") and not candidate.startswith("000"):
        candidate = "+" + candidate[2:]  # the international prefix most of the world dials
    e164 = _valid_e164(candidate)
    if e164 is not None:
        return Phone(e164, text, True)
    try:
        parsed = phonenumbers.parse(candidate, region)
        if phonenumbers.is_valid_number(parsed):
            return Phone(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164), text, True)
    except phonenumbers.NumberParseException:
        pass
    dialled = _NOT_DIALLED.sub("", candidate)
    return Phone(dialled or text, text, False)


_PLUS_DIGITS = re.compile(r"\+([1-9][0-9]{6,17})")


def _valid_e164(candidate: str) -> str | None:
    """The number if `candidate` is `+` and the digits of a valid number that `phonenumbers.parse` would keep as
    they are; None whenever parsing could change it (then the caller parses it in full).

    Most numbers arrive this way (caller ids, CRM exports). `parse` spends most of its time on what such a number
    does not have (extensions, punctuation, a national prefix, the region); the validity check is the same one.
    """
    match = _PLUS_DIGITS.fullmatch(candidate)
    if match is None:
        return None
    digits = match.group(1)
    for length in (1, 2, 3):  # as phonenumbers finds the country calling code: the shortest one that exists
        code = int(digits[:length])
        if code in COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[length:]
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
        code, phonenumbers.region_code_for_country_code(code)
    )
    if metadata is None or national.startswith("0"):  # leading zeros are kept in a way this does not copy
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix and re.match(prefix, national):  # parse might strip a national prefix or carrier code here
        return None
    number = phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
    if not phonenumbers.is_valid_number(number):
        return None
    return "+" + digits


def phone_lookup_values(raw: str, region: str | None) -> list[str]:
    """What a caller id may be stored as: its E.164 form, and its dialled characters for numbers kept as entered."""
    phone = normalise_phone(raw, region)
    values = [phone.value]
    dialled = _NOT_DIALLED.sub("", raw)
    if dialled and dialled not in values:
        values.append(dialled)
    return values


def digits(fragment: str) -> str:
    """The digits of a phone-number fragment typed into search."""
    return re.sub(r"[^0-9]", "", unicodedata.normalize("NFKC", fragment))


_PLAIN_EMAIL = re.compile(
    r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"
)


def normalise_email(raw: str) -> str | None:
    """The address in lower case if it is syntactically an e-mail address, else None (no DNS: nothing leaves).

    Plain ASCII addresses (nearly all of them) are checked by a strict pattern, because a million-row import
    cannot afford `email_validator` on each; anything else (international addresses, odd forms) goes to it.
    """
    text = raw.strip()
    if not text or len(text) > 254:
        return None
    lowered = text.lower()
    if len(lowered.partition("@")[0]) <= 64 and _PLAIN_EMAIL.match(lowered) and not lowered.endswith(".test"):
        return lowered
    try:
        normalised = validate_email(
            text,
            check_deliverability=False,
            allow_smtputf8=True,
            test_environment=get_settings().environment != "production",
        ).normalized
    except EmailNotValidError:
        return None
    return normalised.lower()


def mask_identity(kind: str, value: str) -> str:
    """A contact point as someone without `customers:read_sensitive` sees it."""
    if kind == "phone":
        return mask_phone(value)
    if kind == "email":
        return mask_email(value)
    return value
