"""Many rows into one table inside the unit of work's transaction, in as few statements as the
database allows: COPY on PostgreSQL (psycopg), one executemany elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import JSON, Table, exc, insert
from sqlalchemy.ext.asyncio import AsyncConnection


async def insert_rows(conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (column name -> value, the same keys in every row).

    On PostgreSQL the rows are streamed with COPY on the transaction's own connection: a
    thousand rows cost one statement, with no SQL text that grows with the rows (a multi-row
    INSERT of a thousand rows has thirteen thousand parameters for the driver to parse). Driver
    errors come back as SQLAlchemy's, so the unit of work translates them as any other
    (a unique violation is still EmailTaken).
    """
    if not rows:
        return
    driver = (await conn.get_raw_connection()).driver_connection
    if not isinstance(driver, psycopg.AsyncConnection):
        await conn.execute(insert(table), list(rows))
        return
    columns = list(rows[0])
    json_columns = {name for name in columns if isinstance(table.c[name].type, JSON)}
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
    try:
        async with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                await copy.write_row(
                    [Jsonb(row[c]) if c in json_columns else row[c] for c in columns]
                )
    except psycopg.Error as err:
        raise exc.DBAPIError.instance(statement, None, err, psycopg.Error) from err
