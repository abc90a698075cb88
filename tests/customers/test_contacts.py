"""Pure logic of the customer store: phone numbers, masking, custom-field checks, CSV record splitting."""

from __future__ import annotations

import csv

import pytest

from backend.customers.contacts import normalise_phone, phone_lookup_values
from backend.customers.export import neutralise
from backend.customers.fields import FieldRule, FieldValueError, check_value
from backend.customers.importer import RecordSplitter
from backend.customers.service import region_for_zone
from backend.lib.masking import mask_email, mask_phone

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "typed",
    [
        "+86 138 0013 8000",
        "13800138000",
        "138-0013-8000",
        "0086 138 0013 8000",
        "tel:+8613800138000",
        "+86 (138) 00138000",
    ],
)
def test_common_formats_become_e164(typed):
    phone = normalise_phone(typed, "CN")
    assert phone.valid
    assert phone.value == "+8613800138000"
    assert phone.raw == typed.strip()


def test_local_number_needs_the_region_and_is_kept_flagged_without_it():
    assert normalise_phone("01 42 68 53 00", "FR").value == "+33142685300"
    unparsed = normalise_phone("01 42 68 53 00", None)
    assert not unparsed.valid
    assert unparsed.value == "0142685300"


@pytest.mark.parametrize("garbage", ["ext. 12", "++--", "call me maybe", "1" * 40, "\uff11\uff12\uff13"])
def test_unparseable_numbers_are_kept_never_raise(garbage):
    phone = normalise_phone(garbage, "CN")
    assert not phone.valid
    assert phone.raw == garbage.strip()
    assert phone.value


def test_lookup_values_cover_numbers_kept_as_entered():
    assert phone_lookup_values("+86 138 0013 8000", "CN") == ["+8613800138000"]
    assert phone_lookup_values("(555) 01", "CN") == ["55501"]


def test_masks_keep_country_code_first_three_and_last_four():
    assert mask_phone("+8613800138000") == "+86 138****8000"
    assert mask_phone("+33142685300") == "+33 142**5300"
    assert mask_phone("55501") == "***01"
    assert mask_email("wang.li@example.com") == "w***@example.com"


def test_region_follows_the_tenant_time_zone():
    assert region_for_zone("Asia/Shanghai") == "CN"
    assert region_for_zone("Europe/Paris") == "FR"
    assert region_for_zone("America/New_York") == "US"
    assert region_for_zone("UTC") is None


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        (FieldRule("age", "number", min_value=0, max_value=150), 42, 42),
        (FieldRule("age", "number"), "17.5", 17.5),
        (FieldRule("since", "date"), "2024-02-29", "2024-02-29"),
        (FieldRule("tier", "choice", choices=("gold", "silver")), "gold", "gold"),
        (FieldRule("memo", "text", max_length=5), "  hi  ", "hi"),
        (FieldRule("memo", "text"), None, None),
    ],
)
def test_custom_values_accepted(rule, value, expected):
    assert check_value(rule, value, text_limit=100, from_text=isinstance(value, str)) == expected


@pytest.mark.parametrize(
    ("rule", "value", "message"),
    [
        (FieldRule("age", "number"), "forty", "must be a number"),
        (FieldRule("age", "number"), True, "must be a number"),
        (FieldRule("age", "number", max_value=150), 151, "at most 150"),
        (FieldRule("since", "date"), "2023-02-29", "YYYY-MM-DD"),
        (FieldRule("since", "date"), 20240101, "YYYY-MM-DD"),
        (FieldRule("tier", "choice", choices=("gold",)), "bronze", "one of gold"),
        (FieldRule("memo", "text", max_length=3), "long text", "at most 3"),
        (FieldRule("memo", "text", required=True), "  ", "is required"),
    ],
)
def test_custom_values_refused(rule, value, message):
    with pytest.raises(FieldValueError, match=message):
        check_value(rule, value, text_limit=100, from_text=False)


def test_records_split_on_newlines_outside_quotes_across_pieces():
    splitter = RecordSplitter(max_chars=1000)
    text = 'name,note\r\nA,"two\nlines"\nB,"say ""hi"""\n'
    records = []
    for piece in (text[:14], text[14:20], text[20:]):
        records += list(splitter.feed(piece))
    records += list(splitter.finish())
    rows = [next(csv.reader([r.text])) for r in records]
    assert rows == [["name", "note"], ["A", "two\nlines"], ["B", 'say "hi"']]
    assert [r.line for r in records] == [1, 2, 4]


def test_an_oversize_line_is_cut_off_and_reading_goes_on():
    splitter = RecordSplitter(max_chars=50)
    records = list(splitter.feed("a,b\n" + "x" * 30))
    records += list(splitter.feed("y" * 30 + "\nc,d\n"))
    assert [r.oversize for r in records] == [False, True, False]
    assert records[2].text == "c,d"


def test_an_unclosed_quote_costs_at_most_the_row_limit():
    splitter = RecordSplitter(max_chars=40)
    records = list(splitter.feed('a,"never closed\n' + "more\n" * 20 + "c,d\n"))
    assert records[0].oversize
    assert records[-1].text == "c,d"


@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("@SUM(1+1)", "'@SUM(1+1)"),
        ("-2+3", "'-2+3"),
        ("+8613800138000", "+8613800138000"),
        ("Wang Li", "Wang Li"),
    ],
)
def test_formula_cells_are_neutralised(cell, shown):
    assert neutralise(cell) == shown


def _parsed_in_full(candidate: str) -> str | None:
    """What `phonenumbers` makes of a number, the long way: E.164 if valid, else None."""
    import phonenumbers

    try:
        parsed = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def test_the_e164_shortcut_answers_as_phonenumbers_does_or_not_at_all():
    """Every region's example numbers of every type, and numbers one digit off, longer or shorter: the shortcut
    either gives what a full parse gives, or stands aside (None) and lets the full parse decide."""
    import random

    import phonenumbers
    from phonenumbers import PhoneNumberType

    from backend.customers.contacts import _valid_e164

    rng = random.Random(7)
    candidates: set[str] = set()
    regions = [*sorted(phonenumbers.SUPPORTED_REGIONS), "001"]
    for region in regions:
        for kind in vars(PhoneNumberType).values():
            if not isinstance(kind, int):
                continue
            example = (
                phonenumbers.example_number_for_non_geo_entity(800)
                if region == "001"
                else phonenumbers.example_number_for_type(region, kind)
            )
            if example is None:
                continue
            e164 = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
            candidates.add(e164)
            digits = e164[1:]
            for _ in range(6):
                at = rng.randrange(1, len(digits))
                candidates.add("+" + digits[:at] + str(rng.randrange(10)) + digits[at + 1 :])  # one digit changed
                candidates.add("+" + digits[:at] + digits[at + 1 :])  # one digit less
                candidates.add("+" + digits[:at] + str(rng.randrange(10)) + digits[at:])  # one digit more
            code = str(example.country_code)
            candidates.add("+" + code + "0" + digits[len(code) :])  # a national prefix written after the code
    candidates |= {
        f"+86{rng.choice(['13', '15', '17', '179', '18', '10', '21'])}{rng.randrange(10**9):09d}" for _ in range(500)
    }
    taken = 0
    for candidate in sorted(candidates):
        quick = _valid_e164(candidate)
        if quick is not None:
            taken += 1
            assert quick == _parsed_in_full(candidate), candidate
    assert taken > len(candidates) / 4  # and it is taken for a good part of them (valid ones, mostly)


def test_numbers_in_e164_keep_what_normalising_gave_before():
    assert normalise_phone("+8613800138000", "FR").value == "+8613800138000"
    assert normalise_phone("+390612345678", None).value == "+390612345678"  # Italy keeps its leading zero
    assert normalise_phone("+44020 7946 0000", None).value == "+442079460000"  # a national 0 after the code goes
    assert normalise_phone("+860101234567", "CN").valid == normalise_phone("+86 0 10 1234567", "CN").valid
    bad = normalise_phone("+999123456789", None)
    assert bad.valid is False and bad.value == "+999123456789"
