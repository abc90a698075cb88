"""Custom fields a tenant defines for its customer records: checking a value against its definition."""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from datetime import date
from typing import Any

from backend.customers.models import CustomerFieldDef


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What a custom field accepts (a detached copy of its definition, usable outside a session)."""

    key: str
    type: str
    choices: tuple[str, ...] = ()
    required: bool = False
    sensitive: bool = False
    max_length: int | None = None
    min_value: float | None = None
    max_value: float | None = None
    label: str = ""

    @classmethod
    def of(cls, definition: CustomerFieldDef) -> FieldRule:
        """The rule of a stored definition."""
        return cls(
            key=definition.key,
            type=definition.type,
            choices=tuple(definition.choices),
            required=definition.required,
            sensitive=definition.sensitive,
            max_length=definition.max_length,
            min_value=definition.min_value,
            max_value=definition.max_value,
            label=definition.label,
        )


class FieldValueError(ValueError):
    """A custom-field value that its definition refuses; the message says why, in the user's terms."""


def check_value(rule: FieldRule, value: Any, *, text_limit: int, from_text: bool = False) -> Any:
    """The value as stored (None clears it), or `FieldValueError`.

    `from_text` reads a CSV cell: numbers and dates arrive as text there.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        if rule.required:
            raise FieldValueError("is required")
        return None
    if rule.type == "text":
        if not isinstance(value, str):
            raise FieldValueError("must be text")
        text = unicodedata.normalize("NFC", value).strip()
        limit = min(rule.max_length or text_limit, text_limit)
        if len(text) > limit:
            raise FieldValueError(f"must be at most {limit} characters")
        if any(unicodedata.category(ch) in {"Cc", "Cs"} and ch not in "\n\t" for ch in text):
            raise FieldValueError("must not contain control characters")
        return text
    if rule.type == "number":
        number: float | int
        if from_text and isinstance(value, str):
            try:
                number = float(value.strip().replace(",", "")) if any(c in value for c in ".eE") else int(value)
            except ValueError as exc:
                raise FieldValueError("must be a number") from exc
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldValueError("must be a number")
        else:
            number = value
        if isinstance(number, float) and not math.isfinite(number):
            raise FieldValueError("must be a finite number")
        if rule.min_value is not None and number < rule.min_value:
            raise FieldValueError(f"must be at least {rule.min_value:g}")
        if rule.max_value is not None and number > rule.max_value:
            raise FieldValueError(f"must be at most {rule.max_value:g}")
        return number
    if rule.type == "date":
        if not isinstance(value, str):
            raise FieldValueError("must be a date written YYYY-MM-DD")
        try:
            return date.fromisoformat(value.strip()).isoformat()
        except ValueError as exc:
            raise FieldValueError("must be a date written YYYY-MM-DD") from exc
    if rule.type == "choice":
        if not isinstance(value, str) or value.strip() not in rule.choices:
            raise FieldValueError(f"must be one of {', '.join(rule.choices)}")
        return value.strip()
    raise FieldValueError(f"has an unknown type {rule.type}")


def check_values(
    rules: dict[str, FieldRule], values: dict[str, Any], *, text_limit: int, from_text: bool = False
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Check a set of values; returns (accepted values, [(field, message)]). Unknown keys are errors."""
    accepted: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, value in values.items():
        rule = rules.get(key)
        if rule is None:
            problems.append((f"custom.{key}", "is not a custom field of this tenant"))
            continue
        try:
            checked = check_value(rule, value, text_limit=text_limit, from_text=from_text)
        except FieldValueError as exc:
            problems.append((f"custom.{key}", str(exc)))
            continue
        if checked is not None:
            accepted[key] = checked
        else:
            accepted[key] = None
    return accepted, problems


def missing_required(rules: dict[str, FieldRule], values: dict[str, Any]) -> list[tuple[str, str]]:
    """Required fields that have no value."""
    return [(f"custom.{k}", "is required") for k, r in rules.items() if r.required and values.get(k) in (None, "")]
