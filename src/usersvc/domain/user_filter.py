"""ListUsers.filter: the AIP-160 subset that fits a user directory, parsed into a value object.

Grammar (whitespace between tokens is free; keywords and field names are case-sensitive):

    filter     := term ( "AND" term )*
    term       := "state" ( "=" | ":" ) STATE
                | "roles" ":" ROLE
                | "email" ( "=" | ":" ) EMAIL         exact, or a prefix when it ends in "*"
                | "create_time" ( ">" | ">=" | "<" | "<=" ) TIMESTAMP
                | "last_login_time" ( ">" | ">=" | "<" | "<=" ) TIMESTAMP
                | "password_change_time" ( ">" | ">=" | "<" | "<=" ) TIMESTAMP
                | "labels." KEY ( "=" | "!=" ) LABEL_VALUE
    value      := '"' characters, with \\" and \\\\ escapes '"'  |  bare characters up to
                  white space or a parenthesis
    STATE      := ACTIVE | DISABLED | DELETED, each also with the USER_STATE_ prefix
    TIMESTAMP  := RFC 3339 with a time zone, such as 2026-01-31T09:00:00Z
    KEY        := a label key: a-z first, then a-z, 0-9, "_", "-"; 1 to 63 characters
    LABEL_VALUE:= 0 to 63 characters of a-z, 0-9, "_", "-" (quote the empty value: "")

`labels.team = "billing"` matches users whose label "team" is "billing";
`labels.team != "billing"` matches every other user, including those without a "team" label.

last_login_time and password_change_time may be unset (never logged in; password set before
the column existed): an unset value counts as older than any time, so it matches < and <=
and never > or >=. An admin hunting dormant accounts with `last_login_time < X` finds the
never-used ones too.

Anything else (OR, NOT, parentheses, another field or operator, a bad value) is refused with
the 1-based character position of the problem. The parser only produces values; the adapters
turn them into bound parameters, never into SQL text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from usersvc.domain.auth import KNOWN_ROLES
from usersvc.domain.errors import FieldViolation
from usersvc.domain.labels import is_label_key, is_label_value
from usersvc.domain.models import UserState
from usersvc.domain.validation import EMAIL_MAX, normalize_email

FILTER_MAX_CHARS = 1024
MAX_TERMS = 16
# Echoed pieces of the caller's filter are cut to this many characters.
ECHO_MAX = 40

_STATES = {
    "ACTIVE": UserState.ACTIVE,
    "DISABLED": UserState.DISABLED,
    "DELETED": UserState.DELETED,
    "USER_STATE_ACTIVE": UserState.ACTIVE,
    "USER_STATE_DISABLED": UserState.DISABLED,
    "USER_STATE_DELETED": UserState.DELETED,
}
_OPERATORS = (">=", "<=", "!=", "=", ":", ">", "<")
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


class FilterSyntaxError(ValueError):
    """A filter outside the grammar; `position` is 1-based."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at position {position}")
        self.position = position

    def violation(self) -> FieldViolation:
        return FieldViolation("filter", str(self), "INVALID_FILTER")


@dataclass(frozen=True, slots=True)
class TimeBound:
    """create_time compared with `value`; `inclusive` for >= and <=."""

    value: datetime
    inclusive: bool


# `labels.<key>` terms: equality only.
LABELS_PREFIX = "labels."
LABEL_OPERATORS = ("=", "!=")

# Timestamps that may be unset; an unset one is older than any time.
OPTIONAL_TIME_FIELDS = ("last_login_time", "password_change_time")


@dataclass(frozen=True, slots=True)
class OptionalTimeBound:
    """`field` (one of OPTIONAL_TIME_FIELDS) compared with `value`: before it (< or <=,
    which an unset value satisfies) or after it (> or >=, which it does not)."""

    field: str
    before: bool
    bound: TimeBound

    def holds(self, value: datetime | None) -> bool:
        if value is None:
            return self.before
        b = self.bound
        if self.before:
            return value <= b.value if b.inclusive else value < b.value
        return value >= b.value if b.inclusive else value > b.value

    @property
    def canonical(self) -> str:
        op = ("<" if self.before else ">") + ("=" if self.bound.inclusive else "")
        return f"{self.field}{op}{self.bound.value.isoformat()}"


@dataclass(frozen=True, slots=True)
class UserFilter:
    """Every condition of a list query; all of them must hold (AND). Empty: every user."""

    states: frozenset[UserState] = frozenset()
    roles: frozenset[str] = frozenset()
    email: str | None = None
    email_prefixes: frozenset[str] = frozenset()
    create_after: tuple[TimeBound, ...] = ()
    create_before: tuple[TimeBound, ...] = ()
    # last_login_time and password_change_time bounds.
    optional_times: tuple[OptionalTimeBound, ...] = ()
    # labels.KEY = VALUE and labels.KEY != VALUE terms, as sorted (key, value) pairs.
    labels: frozenset[tuple[str, str]] = frozenset()
    labels_not: frozenset[tuple[str, str]] = frozenset()
    # Set when terms contradict each other (two states, two exact e-mails): nobody matches.
    impossible: bool = False
    # Soft-deleted users match only when set (ListUsersRequest.show_deleted).
    show_deleted: bool = False

    @property
    def canonical(self) -> str:
        """A stable text of the query, the same for every spelling of the same conditions."""

        def times(bounds: tuple[TimeBound, ...]) -> str:
            return ",".join(
                sorted(f"{b.value.isoformat()}{'=' if b.inclusive else ''}" for b in bounds)
            )

        parts = [
            "states=" + ",".join(sorted(s.value for s in self.states)),
            "roles=" + ",".join(sorted(self.roles)),
            "email=" + (self.email or ""),
            "prefixes=" + ",".join(sorted(self.email_prefixes)),
            "after=" + times(self.create_after),
            "before=" + times(self.create_before),
            "impossible=" + str(self.impossible),
        ]
        if self.optional_times:
            # Only when present: tokens of filters without them keep their earlier form.
            parts.append("times=" + ",".join(sorted(b.canonical for b in self.optional_times)))
        if self.labels or self.labels_not:
            # Only when present, like the times above. Keys and values hold no "," or "=".
            parts.append("labels=" + ",".join(f"{k}={v}" for k, v in sorted(self.labels)))
            parts.append("labels_not=" + ",".join(f"{k}={v}" for k, v in sorted(self.labels_not)))
        if self.show_deleted:
            parts.append("show_deleted")
        return "|".join(parts)


def matches(
    f: UserFilter,
    *,
    email: str,
    roles: tuple[str, ...],
    state: UserState,
    create_time: datetime,
    last_login_time: datetime | None = None,
    password_change_time: datetime | None = None,
    labels: Mapping[str, str] | None = None,
) -> bool:
    """Whether a user with these fields satisfies the filter (the stores' semantics)."""
    if f.impossible or any(state is not s for s in f.states):
        return False
    if state is UserState.DELETED and not f.show_deleted:
        return False
    if not f.roles <= set(roles):
        return False
    if f.email is not None and email != f.email:
        return False
    if not all(email.startswith(p) for p in f.email_prefixes):
        return False
    held = labels or {}
    if any(held.get(k) != v for k, v in f.labels):
        return False
    if any(held.get(k) == v for k, v in f.labels_not):
        return False
    for b in f.create_after:
        if not (create_time >= b.value if b.inclusive else create_time > b.value):
            return False
    for b in f.create_before:
        if not (create_time <= b.value if b.inclusive else create_time < b.value):
            return False
    optional = {"last_login_time": last_login_time, "password_change_time": password_change_time}
    return all(b.holds(optional[b.field]) for b in f.optional_times)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", "string", "op", "paren", "end"
    text: str
    position: int  # 1-based


def _echo(text: str) -> str:
    return text if len(text) <= ECHO_MAX else text[: ECHO_MAX - 1] + "…"


def _tokens(source: str) -> list[_Token]:
    found: list[_Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch.isspace():
            i += 1
            continue
        if ch in "()":
            found.append(_Token("paren", ch, i + 1))
            i += 1
            continue
        op = next((o for o in _OPERATORS if source.startswith(o, i)), None)
        if op is not None:
            found.append(_Token("op", op, i + 1))
            i += len(op)
            continue
        if ch == '"':
            start, i, chars = i, i + 1, []
            while True:
                if i >= n:
                    raise FilterSyntaxError("unterminated string", start + 1)
                ch = source[i]
                if ch == "\\":
                    if i + 1 >= n or source[i + 1] not in '"\\':
                        raise FilterSyntaxError('only \\" and \\\\ may be escaped', i + 1)
                    chars.append(source[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                elif not ch.isprintable():  # also NUL, which PostgreSQL text cannot hold
                    raise FilterSyntaxError("control character", i + 1)
                else:
                    chars.append(ch)
                    i += 1
            found.append(_Token("string", "".join(chars), start + 1))
            continue
        if not ch.isprintable():
            raise FilterSyntaxError("control character", i + 1)
        start = i
        # A bare word; after an operator it may hold ":" (timestamps), so only the operators
        # that can start a term end it at the field name.
        while i < n and not source[i].isspace() and source[i] not in '()"':
            if not source[i].isprintable():
                raise FilterSyntaxError("control character", i + 1)
            if found and found[-1].kind == "op":
                i += 1
                continue
            if any(source.startswith(o, i) for o in _OPERATORS):
                break
            i += 1
        found.append(_Token("word", source[start:i], start + 1))
    found.append(_Token("end", "", n + 1))
    return found


def _rfc3339(text: str, *, round_up: bool) -> datetime | None:
    """The instant, truncated to microseconds; rounded up (when digits are dropped) for the
    bounds where that keeps the comparison exact (< and >=)."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(m.group(k)) for k in range(1, 7))
    fraction = (m.group(7) or "").ljust(9, "0")
    micros, rest = int(fraction[:6]), int(fraction[6:])
    try:
        value = datetime(year, month, day, hour, minute, min(second, 59), micros, tzinfo=UTC)
    except ValueError:
        return None
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        if offset >= timedelta(hours=24):
            return None
        value -= offset if m.group(9) == "+" else -offset
    if rest and round_up:
        value += timedelta(microseconds=1)
    return value


class _Parser:
    def __init__(self, source: str) -> None:
        self._tokens = _tokens(source)
        self._at = 0

    def _next(self) -> _Token:
        token = self._tokens[self._at]
        if token.kind != "end":
            self._at += 1
        return token

    def _peek(self) -> _Token:
        return self._tokens[self._at]

    def parse(self) -> UserFilter:
        states: set[UserState] = set()
        roles: set[str] = set()
        emails: set[str] = set()
        prefixes: set[str] = set()
        after: list[TimeBound] = []
        before: list[TimeBound] = []
        optional_times: list[OptionalTimeBound] = []
        labels: dict[str, set[str]] = {}
        labels_not: set[tuple[str, str]] = set()
        state_terms = 0
        terms = 0
        while True:
            terms += 1
            if terms > MAX_TERMS:
                raise FilterSyntaxError(f"at most {MAX_TERMS} terms", self._peek().position)
            field, op, value = self._term()
            if field.text == "state":
                state_terms += 1
                states.add(self._state(value))
            elif field.text == "roles":
                roles.add(self._role(value))
            elif field.text == "email":
                email, prefix = self._email(value)
                (prefixes if prefix else emails).add(email)
            elif field.text.startswith(LABELS_PREFIX):
                key = field.text[len(LABELS_PREFIX) :]
                label_value = self._label_value(value)
                if op.text == "=":
                    labels.setdefault(key, set()).add(label_value)
                else:
                    labels_not.add((key, label_value))
            else:
                moment = _rfc3339(value.text, round_up=op.text in ("<", ">="))
                if moment is None:
                    raise FilterSyntaxError(
                        f"{field.text} needs an RFC 3339 timestamp with a time zone, such as "
                        f'"2026-01-31T09:00:00Z", not "{_echo(value.text)}"',
                        value.position,
                    )
                bound = TimeBound(moment, inclusive=op.text in (">=", "<="))
                if field.text in OPTIONAL_TIME_FIELDS:
                    optional_times.append(
                        OptionalTimeBound(field.text, before=op.text in ("<", "<="), bound=bound)
                    )
                else:
                    (after if op.text in (">", ">=") else before).append(bound)
            token = self._next()
            if token.kind == "end":
                break
            if token.kind == "word" and token.text == "AND":
                continue
            if token.kind == "word" and token.text in ("OR", "NOT"):
                raise FilterSyntaxError(f"{token.text} is not supported; use AND", token.position)
            raise FilterSyntaxError(
                f'expected AND or the end, not "{_echo(token.text)}"', token.position
            )
        equal = {(k, v) for k, values in labels.items() for v in values}
        impossible = (
            len(states) > 1
            or len(emails) > 1
            # A label has one value; it cannot both equal and differ from one.
            or any(len(values) > 1 for values in labels.values())
            or bool(equal & labels_not)
        )
        return UserFilter(
            states=frozenset(states),
            roles=frozenset(roles),
            email=next(iter(emails)) if len(emails) == 1 else None,
            email_prefixes=frozenset(prefixes),
            create_after=tuple(after),
            create_before=tuple(before),
            optional_times=tuple(optional_times),
            labels=frozenset(equal),
            labels_not=frozenset(labels_not),
            impossible=impossible,
        )

    _FIELD_OPERATORS = {
        "state": ("=", ":"),
        "roles": (":",),
        "email": ("=", ":"),
        "create_time": (">", ">=", "<", "<="),
        "last_login_time": (">", ">=", "<", "<="),
        "password_change_time": (">", ">=", "<", "<="),
    }

    def _term(self) -> tuple[_Token, _Token, _Token]:
        field = self._next()
        if field.kind == "end":
            raise FilterSyntaxError("expected a term", field.position)
        if field.kind == "paren":
            raise FilterSyntaxError("parentheses are not supported", field.position)
        if field.kind == "word" and field.text in ("NOT", "OR", "AND"):
            raise FilterSyntaxError(f'expected a field, not "{field.text}"', field.position)
        if field.kind == "word" and field.text.startswith(LABELS_PREFIX):
            if not is_label_key(field.text[len(LABELS_PREFIX) :]):
                raise FilterSyntaxError(
                    f'bad label key in "{_echo(field.text)}": a key is 1 to 63 characters of '
                    'a-z, 0-9, "_" and "-", starting with a letter',
                    field.position,
                )
            allowed: tuple[str, ...] = LABEL_OPERATORS
        elif field.kind != "word" or field.text not in self._FIELD_OPERATORS:
            raise FilterSyntaxError(
                f'unknown field "{_echo(field.text)}"; known: create_time, email, '
                "labels.<key>, last_login_time, password_change_time, roles, state",
                field.position,
            )
        else:
            allowed = self._FIELD_OPERATORS[field.text]
        op = self._next()
        if op.kind != "op" or op.text not in allowed:
            wanted = " or ".join(f'"{o}"' for o in allowed)
            raise FilterSyntaxError(
                f'{_echo(field.text)} takes {wanted}, not "{_echo(op.text)}"', op.position
            )
        value = self._next()
        if value.kind not in ("word", "string"):
            raise FilterSyntaxError(f"expected a value after {op.text}", value.position)
        return field, op, value

    @staticmethod
    def _state(value: _Token) -> UserState:
        state = _STATES.get(value.text)
        if state is None:
            raise FilterSyntaxError(
                f'unknown state "{_echo(value.text)}"; known: ACTIVE, DISABLED, DELETED',
                value.position,
            )
        return state

    @staticmethod
    def _label_value(value: _Token) -> str:
        if not is_label_value(value.text):
            raise FilterSyntaxError(
                f'bad label value "{_echo(value.text)}": a value is 0 to 63 characters of '
                'a-z, 0-9, "_" and "-"',
                value.position,
            )
        return value.text

    @staticmethod
    def _role(value: _Token) -> str:
        if value.text not in KNOWN_ROLES:
            raise FilterSyntaxError(
                f'unknown role "{_echo(value.text)}"; known: {", ".join(sorted(KNOWN_ROLES))}',
                value.position,
            )
        return value.text

    @staticmethod
    def _email(value: _Token) -> tuple[str, bool]:
        text = value.text
        prefix = text.endswith("*")
        body = text[:-1] if prefix else text
        if "*" in body:
            star = value.position + text.index("*") + (1 if value.kind == "string" else 0)
            raise FilterSyntaxError('"*" may only end an e-mail prefix', star)
        email = normalize_email(body)
        if not email:
            raise FilterSyntaxError("expected a non-empty e-mail or prefix", value.position)
        if len(email) > EMAIL_MAX:
            raise FilterSyntaxError(f"an e-mail is at most {EMAIL_MAX} characters", value.position)
        return email, prefix


def parse_filter(source: str) -> UserFilter:
    """The filter's conditions; FilterSyntaxError with the position of the first problem."""
    if len(source) > FILTER_MAX_CHARS:
        raise FilterSyntaxError(
            f"filter is longer than {FILTER_MAX_CHARS} characters", FILTER_MAX_CHARS + 1
        )
    if not source.strip():
        return UserFilter()
    return _Parser(source).parse()
