"""Keyset pagination shared by the list use cases (AIP-132/158)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from usersvc.domain.errors import FieldViolation, InvalidPageToken
from usersvc.domain.models import PageCursor
from usersvc.services.ports import PageCursorCodec

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100


class Keyed(Protocol):
    """Anything listed newest first by (create_time, id)."""

    @property
    def create_time(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


T = TypeVar("T", bound=Keyed)


@dataclass(frozen=True, slots=True)
class PageRequest:
    size: int
    cursor: PageCursor | None
    query: str


def parse_page_request(
    codec: PageCursorCodec,
    *,
    page_size: int,
    page_token: str,
    query: str,
    violations: list[FieldViolation],
) -> PageRequest:
    """Size (0 -> default, capped) and cursor; bad values are appended to `violations`."""
    if page_size < 0:
        violations.append(
            FieldViolation("page_size", "page_size must not be negative", "OUT_OF_RANGE")
        )
    size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
    cursor: PageCursor | None = None
    if page_token:
        try:
            cursor = codec.decode(page_token, query=query)
        except InvalidPageToken as err:
            violations.append(FieldViolation("page_token", str(err), "INVALID_PAGE_TOKEN"))
    return PageRequest(size=size, cursor=cursor, query=query)


def cut_page(
    codec: PageCursorCodec, request: PageRequest, rows: Sequence[T]
) -> tuple[list[T], str]:
    """The page (rows were fetched with limit size + 1) and the next token, empty at the end."""
    page = list(rows[: request.size])
    if len(rows) <= request.size:
        return page, ""
    last = page[-1]
    token = codec.encode(PageCursor(create_time=last.create_time, id=last.id), query=request.query)
    return page, token
