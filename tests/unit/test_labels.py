"""Labels and admin metadata: bounds, the filter terms, the mask paths and who may write them."""

from __future__ import annotations

import uuid

import pytest

from tests.unit.conftest import START
from tests.unit.fakes import FakeUnitOfWorkFactory
from usersvc.domain.auth import Principal, RequestContext
from usersvc.domain.errors import PermissionDenied, ValidationFailed
from usersvc.domain.labels import (
    ADMIN_METADATA_MAX_BYTES,
    LABELS_MAX,
    check_admin_metadata,
    check_labels,
)
from usersvc.domain.models import UserState
from usersvc.domain.update_mask import parse_update_mask
from usersvc.domain.user_filter import FilterSyntaxError, matches, parse_filter
from usersvc.services.user_import import NewUserEntry
from usersvc.services.users import UserService

ADMIN = Principal(user_id=uuid.uuid4(), roles=frozenset({"admin"}))
SERVICE = Principal(user_id=uuid.uuid4(), roles=frozenset({"service"}))
PASSWORD = "correct horse battery staple"


# --- bounds ----------------------------------------------------------------------------------


def test_good_labels_pass_as_they_are() -> None:
    labels = {"team": "billing", "a": "", "cost-center_2": "x" * 63, "k" * 63: "v"}
    assert check_labels(labels, "user.labels") == (labels, [])


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("Bad Key", "x", "INVALID_LABEL_KEY"),
        ("Team", "x", "INVALID_LABEL_KEY"),
        ("1team", "x", "INVALID_LABEL_KEY"),
        ("-team", "x", "INVALID_LABEL_KEY"),
        ("", "x", "INVALID_LABEL_KEY"),
        ("k" * 64, "x", "INVALID_LABEL_KEY"),
        ("team.name", "x", "INVALID_LABEL_KEY"),
        ("team", "Billing", "INVALID_LABEL_VALUE"),
        ("team", "a b", "INVALID_LABEL_VALUE"),
        ("team", "v" * 64, "INVALID_LABEL_VALUE"),
        ("team", "bill\x00ing", "INVALID_LABEL_VALUE"),
    ],
)
def test_a_bad_label_is_named_in_its_violation(key: str, value: str, reason: str) -> None:
    _, violations = check_labels({key: value, "ok": "fine"}, "user.labels")
    # The key is echoed quoted, cut to 40 characters and ASCII-escaped.
    shown = key if len(key) <= 40 else key[:39] + "\\u2026"
    assert [(v.field, v.reason) for v in violations] == [(f'user.labels["{shown}"]', reason)]


def test_too_many_labels_and_many_bad_ones_are_bounded_in_the_answer() -> None:
    _, violations = check_labels({f"k{i}": "v" for i in range(LABELS_MAX + 1)})
    assert [v.reason for v in violations] == ["TOO_MANY_LABELS"]
    _, violations = check_labels({f"K{i}": "v" for i in range(20)}, "labels")
    assert len(violations) == 6
    assert violations[-1].field == "labels" and "15 more" in violations[-1].description


def test_admin_metadata_within_bounds_passes() -> None:
    deep: dict[str, object] = {"leaf": [1, 2.5, True, None, "text\twith tab"]}
    for _ in range(6):
        deep = {"k": deep}
    metadata, violation = check_admin_metadata(deep)
    assert violation is None and metadata == deep


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}}, "TOO_DEEP"),
        ({"a": [[[[[[[[1]]]]]]]]}, "TOO_DEEP"),
        ({"blob": "x" * ADMIN_METADATA_MAX_BYTES}, "TOO_LARGE"),
        ({"k" * 129: 1}, "INVALID_METADATA"),
        ({"": 1}, "INVALID_METADATA"),
        ({"nan": float("nan")}, "INVALID_METADATA"),
        ({"inf": [float("inf")]}, "INVALID_METADATA"),
        ({"nul": "a\x00b"}, "INVALID_METADATA"),
        ({"bell\x07": 1}, "INVALID_METADATA"),
    ],
)
def test_admin_metadata_out_of_bounds_is_refused(metadata: dict[str, object], reason: str) -> None:
    _, violation = check_admin_metadata(metadata, "user.admin_metadata")
    assert violation is not None
    assert (violation.field, violation.reason) == ("user.admin_metadata", reason)


def test_eight_levels_are_allowed_and_nine_are_not() -> None:
    eight: dict[str, object] = {}
    for _ in range(7):
        eight = {"k": eight}
    assert check_admin_metadata(eight)[1] is None
    assert check_admin_metadata({"k": eight})[1] is not None


# --- filter ----------------------------------------------------------------------------------


def test_label_terms_parse_and_match() -> None:
    f = parse_filter('labels.team = "billing" AND labels.env != prod AND state = ACTIVE')
    assert f.labels == {("team", "billing")} and f.labels_not == {("env", "prod")}

    def match(labels: dict[str, str]) -> bool:
        return matches(
            f, email="a@b.c", roles=(), state=UserState.ACTIVE, create_time=START, labels=labels
        )

    assert match({"team": "billing"})
    assert match({"team": "billing", "env": "dev"})
    assert not match({"team": "billing", "env": "prod"})
    assert not match({"team": "ops"})
    assert not match({})
    assert parse_filter('labels.team = "a" AND labels.team = "b"').impossible
    assert parse_filter('labels.team = "a" AND labels.team != "a"').impossible
    assert parse_filter('labels.team = ""').labels == {("team", "")}
    # Page tokens are bound to the canonical text: another label is another query.
    assert parse_filter("labels.team = a").canonical != parse_filter("labels.team = b").canonical
    assert "labels" not in parse_filter("state = ACTIVE").canonical


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ('labels.Team = "billing"', "bad label key"),
        ('labels. = "billing"', "bad label key"),
        ('labels.team = "Billing"', "bad label value"),
        ('labels.team:"billing"', 'takes "=" or "!="'),
        ('labels.team > "billing"', 'takes "=" or "!="'),
        ('label.team = "billing"', "labels.<key>"),
    ],
)
def test_bad_label_terms_are_refused_with_a_position(source: str, fragment: str) -> None:
    with pytest.raises(FilterSyntaxError) as err:
        parse_filter(source)
    assert fragment in str(err.value) and err.value.violation().field == "filter"


# --- update mask -----------------------------------------------------------------------------


def test_mask_paths_for_labels_and_metadata() -> None:
    whole = parse_update_mask(
        ["labels", "admin_metadata"],
        email="",
        name="",
        roles=(),
        labels={"team": "billing"},
        admin_metadata={"note": "vip"},
    )
    assert whole.values == {"labels": {"team": "billing"}, "admin_metadata": {"note": "vip"}}
    one = parse_update_mask(
        ["labels.team", "labels.env"], email="", name="", roles=(), labels={"team": "ops"}
    )
    assert one.values == {} and one.label_edits == {"team": "ops", "env": None}
    bad = parse_update_mask(["labels", "labels.team", "labels.Bad"], email="", name="", roles=())
    assert [v.reason for v in bad.violations] == ["CONFLICTING_PATHS", "INVALID_LABEL_KEY"]
    assert bad.violations[1].field == 'user.labels["Bad"]'


# --- service: who may write and read ---------------------------------------------------------


async def test_only_admins_write_labels_and_metadata_and_only_admins_read_metadata(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    created = await service.create_user(
        ctx=RequestContext(SERVICE),
        email="svc-made@example.com",
        name="Service Made",
        password=PASSWORD,
        labels={"team": "billing"},
    )
    assert created.labels == {"team": "billing"}
    with pytest.raises(PermissionDenied):
        await service.create_user(
            ctx=RequestContext(SERVICE),
            email="svc-meta@example.com",
            name="Service Meta",
            password=PASSWORD,
            admin_metadata={"note": "x"},
        )
    me = Principal(user_id=created.id, roles=frozenset())
    for paths in (["admin_metadata"], ["labels"], ["labels.team"]):
        with pytest.raises(PermissionDenied):
            await service.update_user(
                ctx=RequestContext(me),
                user_id=str(created.id),
                paths=paths,
                email="",
                name="",
                admin_metadata={"note": "self-made"},
                etag="",
            )
    stored = uow.store[created.id]
    assert stored.admin_metadata == {} and stored.version == 1

    updated = await service.update_user(
        ctx=RequestContext(ADMIN),
        user_id=str(created.id),
        paths=["admin_metadata", "labels.env", "labels.team"],
        email="",
        name="",
        labels={"env": "prod"},
        admin_metadata={"note": "vip", "tier": 2},
        etag=created.etag,
    )
    assert updated.labels == {"env": "prod"}
    assert updated.admin_metadata == {"note": "vip", "tier": 2}
    assert updated.etag != created.etag
    # The user itself, and a service, read the labels but never the metadata.
    for caller in (me, SERVICE):
        seen = await service.get_user(str(created.id), ctx=RequestContext(caller))
        assert seen.labels == {"env": "prod"} and seen.admin_metadata == {}
    listed = await service.list_users(
        page_size=10,
        page_token="",
        email="",
        filter="labels.env = prod",
        ctx=RequestContext(SERVICE),
    )
    assert [u.id for u in listed.users] == [created.id] and listed.users[0].admin_metadata == {}
    assert (await service.get_user(str(created.id), ctx=RequestContext(ADMIN))).admin_metadata

    # Audited with JSON values; the feed names both fields but never carries the metadata.
    change = uow.audit[-1].changes
    assert change["labels"] == {"old": {"team": "billing"}, "new": {"env": "prod"}}
    assert change["admin_metadata"] == {"old": {}, "new": {"note": "vip", "tier": 2}}
    event = uow.user_events[-1]
    assert event.changed_fields == ("admin_metadata", "labels")
    assert event.user.admin_metadata == {} and event.user.labels == {"env": "prod"}


async def test_single_label_edits_respect_the_limit_and_an_unchanged_map_keeps_the_etag(
    service: UserService,
) -> None:
    full = {f"k{i}": "v" for i in range(LABELS_MAX)}
    user = await service.create_user(
        ctx=RequestContext(ADMIN),
        email="full@example.com",
        name="Full",
        password=PASSWORD,
        labels=full,
    )
    with pytest.raises(ValidationFailed) as err:
        await service.update_user(
            ctx=RequestContext(ADMIN),
            user_id=str(user.id),
            paths=["labels.extra"],
            email="",
            name="",
            labels={"extra": "x"},
            etag="",
        )
    assert err.value.violations[0].reason == "TOO_MANY_LABELS"
    same = await service.update_user(
        ctx=RequestContext(ADMIN),
        user_id=str(user.id),
        paths=["labels.k0"],
        email="",
        name="",
        labels={"k0": "v"},
        etag="",
    )
    assert same.etag == user.etag
    swapped = await service.update_user(
        ctx=RequestContext(ADMIN),
        user_id=str(user.id),
        paths=["labels.k0", "labels.extra"],
        email="",
        name="",
        labels={"extra": "x"},
        etag="",
    )
    assert "k0" not in swapped.labels and swapped.labels["extra"] == "x"
    assert len(swapped.labels) == LABELS_MAX


async def test_create_validates_labels_and_metadata_with_the_other_fields(
    service: UserService,
) -> None:
    with pytest.raises(ValidationFailed) as err:
        await service.create_user(
            ctx=RequestContext(ADMIN),
            email="not-an-email",
            name="Bad Labels",
            password=PASSWORD,
            labels={"Bad Key": "x"},
            admin_metadata={"deep": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {}}}}}}}}},
        )
    assert {v.field for v in err.value.violations} == {
        "email",
        'labels["Bad Key"]',
        "admin_metadata",
    }


async def test_batch_entries_carry_labels_and_metadata_and_fail_alone_on_bad_ones(
    service: UserService, uow: FakeUnitOfWorkFactory
) -> None:
    outcomes = await service.batch_create_users(
        ctx=RequestContext(ADMIN),
        entries=[
            NewUserEntry(
                email="batch-good@example.com",
                name="Batch Good",
                password=PASSWORD,
                labels={"team": "billing"},
                admin_metadata={"source": "import"},
            ),
            NewUserEntry(
                email="batch-bad@example.com",
                name="Batch Bad",
                password=PASSWORD,
                labels={"Bad": "x"},
            ),
        ],
    )
    good, bad = outcomes
    assert good.user is not None and good.user.labels == {"team": "billing"}
    assert uow.store[good.user.id].admin_metadata == {"source": "import"}
    assert isinstance(bad.error, ValidationFailed)
    assert [v.field for v in bad.error.violations] == ['users[1].labels["Bad"]']
    created = next(e for e in uow.audit if e.user_id == good.user.id)
    assert created.changes["labels"]["new"] == {"team": "billing"}
    assert created.changes["admin_metadata"]["new"] == {"source": "import"}


async def test_a_retry_with_other_labels_is_another_request(service: UserService) -> None:
    key = str(uuid.uuid4())

    async def create(labels: dict[str, str]) -> object:
        return await service.create_user(
            ctx=RequestContext(ADMIN),
            email="retry@example.com",
            name="Retry",
            password=PASSWORD,
            request_id=key,
            labels=labels,
        )

    first = await create({"team": "a"})
    assert await create({"team": "a"}) == first
    with pytest.raises(ValidationFailed) as err:
        await create({"team": "b"})
    assert err.value.reason == "REQUEST_ID_REUSED"
