"""How long the spend report (`GET /v1/usage`) takes on one tenant's month of 1,000,000 settled
turns: a scratch database is filled (generate_series), then each grouping's statement is run as
the read API runs it (the tenant's reader, row-level security) and timed with `EXPLAIN ANALYZE`,
beside the same report computed from `chat_turns` (what it would cost without the quota rows).

    python -m minichat.bench.spend_report [--turns 1000000] [--users 2000] [--repeat 5]

Uses `MINICHAT_ADMIN_DATABASE_URL` (or `MINICHAT_DATABASE_URL`) to create and drop the database.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import date

import asyncpg

from minichat.bench.scratch import scratch_database
from minichat.domain.spend import MAX_ROWS
from minichat.settings import Settings
from minichat.storage.read_api import spend_sql
from minichat.storage.readers import read_as_tenant
from minichat.storage.spend_bench import daily_rows, explain, fill, from_turns_sql

GROUPINGS = (
    ("user",),
    ("day",),
    ("model",),
    ("user", "day"),
    ("day", "model"),
    ("user", "model"),
    ("user", "day", "model"),
)
FIRST_DAY = date(2026, 12, 1)
COLUMNS = {"user": "user_id", "day": "day", "model": "model"}


async def measure(admin_url: str, turns: int, users: int, days: int, repeat: int, verbose: bool) -> None:
    tenant = uuid.uuid4()
    async with scratch_database(admin_url, "spend") as url:
        con = await asyncpg.connect(url)
        try:
            began = time.perf_counter()
            await fill(con, tenant, turns, users, days, FIRST_DAY, 100_000)
            took = time.perf_counter() - began
            print(f"filled {turns:,} turns of {users:,} users over {days} days in {took:.1f} s")
            rows = await daily_rows(con, tenant)
            print(f"daily total quota rows of the tenant: {rows:,}")
            last = date.fromordinal(FIRST_DAY.toordinal() + days - 1)
            a_user = uuid.UUID("00000001-0000-4000-8000-000000000000")
            cases: list[tuple[str, str, list[object]]] = []
            for keys in GROUPINGS:
                cases.append(
                    ("+".join(keys), spend_sql(keys, False), [tenant, FIRST_DAY, last, MAX_ROWS + 1])
                )
            for keys in (("day",), ("day", "model")):
                cases.append(
                    (
                        "+".join(keys) + " user_id=U",
                        spend_sql(keys, True),
                        [tenant, FIRST_DAY, last, MAX_ROWS + 1, a_user],
                    )
                )
            print(
                f"{'group_by':<28} {'report ms (median, max)':>24} {'rows':>7}   {'from chat_turns ms':>18}"
            )
            for name, sql, args in cases:
                times, count, plan = await _timed(con, tenant, sql, args, repeat)
                columns = ", ".join(COLUMNS[k] for k in name.split(" ")[0].split("+"))
                turns_ms = "-"
                if " " not in name:
                    t_times, _, _ = await _timed(con, tenant, from_turns_sql(columns), args, min(repeat, 3))
                    turns_ms = f"{statistics.median(t_times):.0f}"
                median = statistics.median(times)
                print(f"{name:<28} {median:>12.1f} {max(times):>10.1f} {count:>7}   {turns_ms:>18}")
                if verbose:
                    print(plan)
        finally:
            await con.close()


async def _timed(
    con: asyncpg.Connection, tenant: uuid.UUID, sql: str, args: list[object], repeat: int
) -> tuple[list[float], int, str]:
    times, count, plan = [], 0, ""
    for _ in range(repeat):
        async with con.transaction(readonly=True):
            await read_as_tenant(con, tenant)
            ms, count, plan = await explain(con, sql, *args)
        times.append(ms)
    return times, count, plan


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--plans", action="store_true", help="print each statement's plan")
    options = parser.parse_args()
    settings = Settings()
    asyncio.run(
        measure(settings.admin_url, options.turns, options.users, options.days, options.repeat, options.plans)
    )


if __name__ == "__main__":
    main()
