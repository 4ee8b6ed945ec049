"""Input rules of usersvc.domain.validation: what is accepted, how it is normalised, what is not."""

from __future__ import annotations

import uuid

import pytest

from usersvc.domain.validation import (
    EMAIL_MAX,
    check_email,
    check_name,
    check_password,
    normalize_email,
    parse_user_id,
)

# 64 + 1 + 189 = 254 characters: the longest address the rules allow.
LONGEST_EMAIL = "l" * 64 + "@" + "a" * 63 + "." + "b" * 63 + "." + "c" * 61


def test_longest_email_fixture_is_at_the_limit() -> None:
    assert len(LONGEST_EMAIL) == EMAIL_MAX == 254


# --- email -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("alice@example.com", "alice@example.com"),
        ("  Alice@Example.COM \t\n", "alice@example.com"),
        ("Ａ@ｘ.com", "a@x.com"),  # fullwidth letters: NFKC, then lower-case
        ("ＢＯＢ＠ＥＸＡＭＰＬＥ．ＣＯＭ", "bob@example.com"),  # fullwidth @ and . too
        ("\u212aelvin@example.com", "kelvin@example.com"),  # KELVIN SIGN -> K -> k
        ("ZOË@Example.com", "zoë@example.com"),
    ],
)
def test_normalize_email_trims_nfkc_normalises_and_lower_cases(raw: str, normalised: str) -> None:
    assert normalize_email(raw) == normalised


@pytest.mark.parametrize("raw", ["  Ａ@ｘ.com ", "MiXeD.Case+tag@Sub.Example.ORG", "\u212a@x.io"])
def test_normalize_email_is_idempotent(raw: str) -> None:
    once = normalize_email(raw)
    assert normalize_email(once) == once


def test_check_email_returns_the_normalised_address_when_valid() -> None:
    assert check_email("  Ａ@ｘ.com ") == ("a@x.com", None)


def test_check_email_accepts_exactly_254_characters() -> None:
    email, violation = check_email(LONGEST_EMAIL.upper())
    assert violation is None
    assert email == LONGEST_EMAIL


def test_check_email_counts_length_after_trimming() -> None:
    email, violation = check_email(f"   {LONGEST_EMAIL}   ")
    assert violation is None
    assert email == LONGEST_EMAIL


def test_check_email_refuses_255_characters() -> None:
    too_long = LONGEST_EMAIL + "c"
    email, violation = check_email(too_long)
    assert violation is not None
    assert (violation.field, violation.reason) == ("email", "TOO_LONG")
    assert "254" in violation.description
    assert email == too_long


@pytest.mark.parametrize("raw", ["", "   ", "\t\n"])
def test_check_email_requires_a_value(raw: str) -> None:
    _, violation = check_email(raw)
    assert violation is not None
    assert (violation.field, violation.reason) == ("email", "REQUIRED")


@pytest.mark.parametrize(
    "raw",
    [
        "plainaddress",
        "@example.com",
        "alice@",
        "alice@localhost",  # no dot in the domain
        "alice@@example.com",
        "alice@bob@example.com",
        "al ice@example.com",
        "alice@exa mple.com",
        "alice@example..com",
        "alice@.example.com",
        "alice@example.com.",
        "alice@example.c",  # one-letter top-level label
        "al\x00ice@example.com",
        "alice@example.com\nbob",
        "l" * 65 + "@example.com",  # local part over 64
        "alice@" + "a" * 64 + ".com",  # domain label over 63
    ],
)
def test_check_email_refuses_malformed_addresses(raw: str) -> None:
    _, violation = check_email(raw)
    assert violation is not None
    assert (violation.field, violation.reason) == ("email", "INVALID_FORMAT")


def test_check_email_reports_the_field_path_it_is_given() -> None:
    _, violation = check_email("nope", "user.email")
    assert violation is not None
    assert violation.field == "user.email"


# --- name ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "trimmed"),
    [
        ("Al", "Al"),
        ("  Alice Liddell \t", "Alice Liddell"),
        ("李雷", "李雷"),
        ("Zoë", "Zoë"),
        ("n" * 100, "n" * 100),
        ("   " + "n" * 100 + "   ", "n" * 100),
    ],
)
def test_check_name_accepts_2_to_100_characters_after_trimming(raw: str, trimmed: str) -> None:
    assert check_name(raw) == (trimmed, None)


@pytest.mark.parametrize("raw", ["", "A", "   A   ", "    ", "n" * 101, " " + "n" * 101 + " "])
def test_check_name_refuses_lengths_outside_2_to_100(raw: str) -> None:
    name, violation = check_name(raw)
    assert violation is not None
    assert (violation.field, violation.reason) == ("name", "OUT_OF_RANGE")
    assert name == raw.strip()


@pytest.mark.parametrize("raw", ["Al\x00ice", "Al\nice", "Al\x7fice", "Al\x1bice"])
def test_check_name_refuses_control_characters(raw: str) -> None:
    _, violation = check_name(raw, "user.name")
    assert violation is not None
    assert (violation.field, violation.reason) == ("user.name", "INVALID_FORMAT")


# --- password --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        "p" * 8,
        "p" * 128,
        "        ",  # any characters, no composition rules, not trimmed
        "  pass  ",
        "🔑" * 8,  # 8 code points, 32 bytes of UTF-8
        "🔑" * 128,  # 128 code points, 512 bytes: counted in code points, not bytes
        "пароль-パスワード",
        "e\u0301" * 4,  # 8 code points (4 user-perceived characters)
    ],
)
def test_check_password_accepts_8_to_128_code_points_of_any_unicode(password: str) -> None:
    assert check_password(password) is None


@pytest.mark.parametrize("password", ["", "p" * 7, "🔑" * 7, "p" * 129, "🔑" * 129, "p" * 10_000])
def test_check_password_refuses_lengths_outside_8_to_128(password: str) -> None:
    violation = check_password(password)
    assert violation is not None
    assert (violation.field, violation.reason) == ("password", "OUT_OF_RANGE")


def test_check_password_violation_never_contains_the_password() -> None:
    password = "hunter2"
    violation = check_password(password)
    assert violation is not None
    assert password not in violation.description


# --- user id ---------------------------------------------------------------------------------


def test_parse_user_id_accepts_a_canonical_uuid() -> None:
    expected = uuid.uuid4()
    assert parse_user_id(str(expected)) == (expected, None)


def test_parse_user_id_is_case_insensitive() -> None:
    expected = uuid.uuid4()
    assert parse_user_id(str(expected).upper()) == (expected, None)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not-a-uuid",
        "1234",
        "0" * 31,
        "0" * 33,
        "g" * 32,
        "12345678-1234-5678-1234-56781234567",  # one digit short
        "12345678-1234-5678-1234-5678123456789",  # one digit long
    ],
)
def test_parse_user_id_refuses_non_uuids(raw: str) -> None:
    user_id, violation = parse_user_id(raw, "user.id")
    assert user_id is None
    assert violation is not None
    assert (violation.field, violation.reason) == ("user.id", "INVALID_FORMAT")


@pytest.mark.parametrize(
    "raw",
    [
        "+2345678123456781234567812345678",  # parsed as 02345678-1234-...
        "0x345678123456781234567812345678",  # parsed as 00345678-1234-...
        "1_345678123456781234567812345678",  # parsed as 01345678-1234-...
        "12345678-1234-5678-1234-56781234567\u0668",  # ARABIC-INDIC DIGIT EIGHT
    ],
)
def test_parse_user_id_refuses_strings_that_only_int_would_read_as_hex(raw: str) -> None:
    user_id, violation = parse_user_id(raw)
    assert violation is not None
    assert user_id is None
