"""ListUsers.filter: the grammar, every term, and the position of every kind of error."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from usersvc.domain.models import UserState
from usersvc.domain.user_filter import (
    FILTER_MAX_CHARS,
    MAX_TERMS,
    FilterSyntaxError,
    OptionalTimeBound,
    TimeBound,
    UserFilter,
    matches,
    parse_filter,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_an_empty_or_blank_filter_is_no_condition() -> None:
    assert parse_filter("") == UserFilter()
    assert parse_filter("  \t ") == UserFilter()


@pytest.mark.parametrize(
    ("source", "state"),
    [
        ("state = ACTIVE", UserState.ACTIVE),
        ("state=DISABLED", UserState.DISABLED),
        ('state:"USER_STATE_DISABLED"', UserState.DISABLED),
        ("state = USER_STATE_ACTIVE", UserState.ACTIVE),
    ],
)
def test_state(source: str, state: UserState) -> None:
    assert parse_filter(source) == UserFilter(states=frozenset({state}))


def test_roles_is_has() -> None:
    assert parse_filter('roles:"admin"') == UserFilter(roles=frozenset({"admin"}))
    assert parse_filter("roles:service AND roles:admin").roles == {"admin", "service"}


def test_email_prefix_and_exact_are_normalised() -> None:
    assert parse_filter('email:"  ADA*"') == UserFilter(email_prefixes=frozenset({"ada"}))
    assert parse_filter("email = Ada@Example.COM") == UserFilter(email="ada@example.com")
    # Full-width letters fold to ASCII (NFKC), like stored e-mails.
    assert parse_filter('email:"ＡＤＡ*"').email_prefixes == {"ada"}


def test_quoted_values_take_escapes_and_like_wildcards_stay_literal() -> None:
    assert parse_filter(r'email:"a_%\\\"b*"').email_prefixes == {'a_%\\"b'}


@pytest.mark.parametrize(
    ("source", "after", "before"),
    [
        ("create_time > 2026-01-01T00:00:00Z", (TimeBound(T0, False),), ()),
        ('create_time >= "2026-01-01T00:00:00Z"', (TimeBound(T0, True),), ()),
        ("create_time<2026-01-01T01:00:00+01:00", (), (TimeBound(T0, False),)),
        ('create_time <= "2025-12-31T19:00:00-05:00"', (), (TimeBound(T0, True),)),
        ("create_time > 2026-01-01t00:00:00.000000z", (TimeBound(T0, False),), ()),
    ],
)
def test_create_time_bounds(
    source: str, after: tuple[TimeBound, ...], before: tuple[TimeBound, ...]
) -> None:
    assert parse_filter(source) == UserFilter(create_after=after, create_before=before)


def test_nanoseconds_round_so_that_each_comparison_stays_exact() -> None:
    # Stored times have microseconds: t < x.0000001 means t <= x, which is t < x + 1 us;
    # t > x.0000001 means t >= x + 1 us, which is t > x.
    one_us = timedelta(microseconds=1)
    f = parse_filter(
        "create_time >= 2026-01-01T00:00:00.0000001Z AND create_time > 2026-01-01T00:00:00.0000001Z"
        " AND create_time < 2026-01-01T00:00:00.0000001Z"
        " AND create_time <= 2026-01-01T00:00:00.0000001Z"
    )
    assert f.create_after == (TimeBound(T0 + one_us, True), TimeBound(T0, False))
    assert f.create_before == (TimeBound(T0 + one_us, False), TimeBound(T0, True))


def test_terms_combine_with_and() -> None:
    f = parse_filter(
        'state = ACTIVE AND roles:"service" AND email:"svc-*" '
        'AND create_time >= "2026-01-01T00:00:00Z" AND create_time < "2026-02-01T00:00:00Z"'
    )
    assert f.states == {UserState.ACTIVE}
    assert f.roles == {"service"}
    assert f.email_prefixes == {"svc-"}
    assert len(f.create_after) == len(f.create_before) == 1
    assert matches(
        f,
        email="svc-billing@x.io",
        roles=("service",),
        state=UserState.ACTIVE,
        create_time=T0 + timedelta(days=3),
    )
    for changed in (
        {"email": "billing@x.io"},
        {"roles": ("admin",)},
        {"state": UserState.DISABLED},
        {"create_time": T0 - timedelta(microseconds=1)},
        {"create_time": datetime(2026, 2, 1, tzinfo=UTC)},
    ):
        fields = {
            "email": "svc-billing@x.io",
            "roles": ("service",),
            "state": UserState.ACTIVE,
            "create_time": T0,
            **changed,
        }
        assert not matches(f, **fields)  # type: ignore[arg-type]


def test_contradicting_terms_match_nobody() -> None:
    assert parse_filter("state = ACTIVE AND state = DISABLED").impossible
    assert parse_filter("email = a@x.io AND email = b@x.io").impossible
    assert not parse_filter("state = ACTIVE AND state = USER_STATE_ACTIVE").impossible


def test_the_canonical_form_ignores_spelling() -> None:
    a = parse_filter('state=ACTIVE AND roles:admin AND email:"ADA*"')
    b = parse_filter('email : "ada*"   AND roles:"admin" AND state = USER_STATE_ACTIVE')
    assert a.canonical == b.canonical
    assert a.canonical != parse_filter("state=ACTIVE AND roles:admin").canonical


@pytest.mark.parametrize(
    ("source", "position", "says"),
    [
        ("state = ACTIVE OR state = DISABLED", 16, "OR is not supported"),
        ("NOT state = ACTIVE", 1, 'expected a field, not "NOT"'),
        ("(state = ACTIVE)", 1, "parentheses are not supported"),
        ("name = Ada", 1, 'unknown field "name"'),
        ("state != ACTIVE", 7, 'state takes "=" or ":", not "!="'),
        ("state > ACTIVE", 7, 'state takes "=" or ":"'),
        ("roles = admin", 7, 'roles takes ":"'),
        ("email > a", 7, 'email takes "=" or ":"'),
        ("create_time = 2026-01-01T00:00:00Z", 13, "create_time takes"),
        ("create_time:2026-01-01T00:00:00Z", 12, "create_time takes"),
        ("state", 6, "state takes"),
        ("state = ", 9, "expected a value"),
        ("state = PENDING", 9, 'unknown state "PENDING"'),
        ("roles:root", 7, 'unknown role "root"'),
        ('email:"a*b"', 9, '"*" may only end'),
        ('email:"*"', 7, "non-empty"),
        ('email:"abc', 7, "unterminated string"),
        (r'email:"a\nb"', 9, "may be escaped"),
        ("create_time > yesterday", 15, "RFC 3339"),
        ("create_time > 2026-01-01T00:00:00", 15, "RFC 3339"),
        ("create_time > 2026-01-01", 15, "RFC 3339"),
        ("create_time > 2026-02-30T00:00:00Z", 15, "RFC 3339"),
        ("create_time > 2026-01-01T24:00:00Z", 15, "RFC 3339"),
        ("state = ACTIVE state = DISABLED", 16, "expected AND or the end"),
        ("state = ACTIVE and roles:admin", 16, "expected AND or the end"),
        ("state = ACTIVE AND", 19, "expected a term"),
        ("state = ACT\x00IVE", 12, "control character"),
        ("\x07", 1, "control character"),
        ('email:"a\x00*"', 9, "control character"),
        ('email:"a\nb*"', 9, "control character"),
    ],
)
def test_errors_name_the_position(source: str, position: int, says: str) -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse_filter(source)
    assert caught.value.position == position
    assert says in str(caught.value)
    assert str(caught.value).endswith(f"at position {position}")
    violation = caught.value.violation()
    assert (violation.field, violation.reason) == ("filter", "INVALID_FILTER")


def test_the_length_and_the_number_of_terms_are_bounded() -> None:
    with pytest.raises(FilterSyntaxError, match=f"longer than {FILTER_MAX_CHARS}"):
        parse_filter("state = ACTIVE AND " * 100)
    with pytest.raises(FilterSyntaxError, match=f"at most {MAX_TERMS} terms"):
        parse_filter(" AND ".join(["roles:admin"] * (MAX_TERMS + 1)))
    assert parse_filter(" AND ".join(["roles:admin"] * MAX_TERMS)).roles == {"admin"}


def test_echoed_values_are_cut_short() -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse_filter("state = " + "X" * 500)
    assert len(str(caught.value)) < 120


# --- last_login_time and password_change_time ----------------------------------------------


@pytest.mark.parametrize("field", ["last_login_time", "password_change_time"])
@pytest.mark.parametrize(
    ("op", "before", "inclusive"),
    [("<", True, False), ("<=", True, True), (">", False, False), (">=", False, True)],
)
def test_optional_time_bounds(field: str, op: str, before: bool, inclusive: bool) -> None:
    parsed = parse_filter(f'{field} {op} "2026-01-01T00:00:00Z"')
    assert parsed == UserFilter(
        optional_times=(OptionalTimeBound(field, before=before, bound=TimeBound(T0, inclusive)),)
    )
    # Not confused with create_time's bounds.
    assert (parsed.create_after, parsed.create_before) == ((), ())


def test_an_unset_time_is_older_than_any() -> None:
    """Never logged in: matches `< X` and `<= X` (a dormant account), never `>` or `>=`."""
    user = {
        "email": "a@x.io",
        "roles": (),
        "state": UserState.ACTIVE,
        "create_time": T0 + timedelta(days=30),
    }
    for source, expected in [
        ("last_login_time < 2026-01-01T00:00:00Z", True),
        ("last_login_time <= 2026-01-01T00:00:00Z", True),
        ("last_login_time > 2026-01-01T00:00:00Z", False),
        ("last_login_time >= 2026-01-01T00:00:00Z", False),
        ("password_change_time < 2026-01-01T00:00:00Z", True),
        ("password_change_time >= 1970-01-01T00:00:00Z", False),
    ]:
        assert matches(parse_filter(source), **user) is expected, source  # type: ignore[arg-type]


def test_a_set_time_compares_as_written() -> None:
    f = parse_filter(
        "last_login_time >= 2026-01-01T00:00:00Z AND last_login_time < 2026-02-01T00:00:00Z"
    )
    base = {"email": "a@x.io", "roles": (), "state": UserState.ACTIVE, "create_time": T0}
    assert matches(f, **base, last_login_time=T0)  # type: ignore[arg-type]
    assert matches(f, **base, last_login_time=T0 + timedelta(days=30))  # type: ignore[arg-type]
    assert not matches(f, **base, last_login_time=T0 - timedelta(microseconds=1))  # type: ignore[arg-type]
    assert not matches(f, **base, last_login_time=datetime(2026, 2, 1, tzinfo=UTC))  # type: ignore[arg-type]
    # The other field is independent.
    g = parse_filter("password_change_time > 2026-01-01T00:00:00Z")
    assert not matches(g, **base, last_login_time=T0 + timedelta(days=1))  # type: ignore[arg-type]
    assert matches(g, **base, password_change_time=T0 + timedelta(days=1))  # type: ignore[arg-type]


def test_optional_times_have_their_own_canonical_form() -> None:
    a = parse_filter('last_login_time < "2026-01-01T01:00:00+01:00" AND state = ACTIVE')
    b = parse_filter("state=USER_STATE_ACTIVE AND last_login_time<2026-01-01T00:00:00Z")
    assert a.canonical == b.canonical
    assert a.canonical != parse_filter("state = ACTIVE").canonical
    assert (
        a.canonical
        != parse_filter("state = ACTIVE AND last_login_time <= 2026-01-01T00:00:00Z").canonical
    )
    assert (
        a.canonical
        != parse_filter("state = ACTIVE AND password_change_time < 2026-01-01T00:00:00Z").canonical
    )
    # Filters without them keep the form page tokens were bound to before they existed.
    assert "times=" not in parse_filter("state = ACTIVE").canonical


@pytest.mark.parametrize(
    ("source", "position", "says"),
    [
        ("last_login_time < yesterday", 19, "last_login_time needs an RFC 3339 timestamp"),
        ('last_login_time < "2026-13-01T00:00:00Z"', 19, "RFC 3339"),
        ("last_login_time < 2026-01-01T00:00:00", 19, "RFC 3339"),
        ("password_change_time > 2026-01-01", 24, "password_change_time needs"),
        ("last_login_time = 2026-01-01T00:00:00Z", 17, "last_login_time takes"),
        ("last_login_time:2026-01-01T00:00:00Z", 16, "last_login_time takes"),
        ("last_login = 2026-01-01T00:00:00Z", 1, 'unknown field "last_login"'),
    ],
)
def test_bad_optional_time_terms_name_the_position(source: str, position: int, says: str) -> None:
    with pytest.raises(FilterSyntaxError) as caught:
        parse_filter(source)
    assert caught.value.position == position
    assert says in str(caught.value)
    assert caught.value.violation().field == "filter"
