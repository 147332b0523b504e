"""SQL of the spend report's measurement (`python -m minichat.bench.spend_report`): a scratch
database filled with one tenant's month of settled turns, and the report's queries timed with
`EXPLAIN ANALYZE`. Never run against a live database."""

from __future__ import annotations

from datetime import date
from typing import Any
from uuid import UUID

import asyncpg

_CHATS = """
INSERT INTO chats (id, tenant_id, user_id, model, created_at, updated_at)
SELECT gen_random_uuid(), $1, u.user_id, 'gpt-5-mini', now(), now()
FROM (SELECT (lpad(to_hex(n), 8, '0') || '-0000-4000-8000-000000000000')::uuid AS user_id
      FROM generate_series(1, $2) n) u
"""

# Turn n: user 1 + n mod users, day (n / users) mod days (every user every day), model (n/7) mod 3;
# settled, most on their usage (`actual`), every 10th estimated (tokens not priced), every 50th
# adjusted.
_TURNS = """
INSERT INTO chat_turns (
    id, tenant_id, chat_id, request_id, requester_type, requester_user_id, state,
    selected_model, effective_model, reserve_tokens, max_output_tokens_applied, reserved_credits_micro,
    policy_version_applied, minimal_generation_floor_applied, period_daily, period_monthly,
    started_at, completed_at, terminal_at, updated_at, usage_known, input_tokens, output_tokens,
    usage_model, billing_outcome, settlement_method, committed_credits_micro, overshoot_capped,
    settled_at, adjusted_at)
SELECT gen_random_uuid(), $1, c.id, gen_random_uuid(), 'user', c.user_id, 'completed',
       g.model, g.model, 20000, 16384, 500000, 1, 50, g.day, date_trunc('month', g.day)::date,
       g.at, g.at, g.at, g.at, true, g.input_tokens, g.output_tokens, g.model, 'completed',
       CASE WHEN g.n % 10 = 0 THEN 'estimated' ELSE 'actual' END, g.credits, false, g.at,
       CASE WHEN g.n % 50 = 0 THEN g.at END
FROM (
    SELECT n, (lpad(to_hex(1 + n % $2), 8, '0') || '-0000-4000-8000-000000000000')::uuid AS user_id,
           ($4::date + (n / $2 % $3)::int) AS day,
           ($4::date + (n / $2 % $3)::int)::timestamptz + make_interval(secs => n % 86400) AS at,
           (ARRAY['gpt-5', 'gpt-5-mini', 'gpt-5-nano'])[1 + (n / 7) % 3] AS model,
           100 + n % 900 AS input_tokens, 50 + n % 450 AS output_tokens, 1000 + n % 9000 AS credits
    FROM generate_series($5::bigint, $6::bigint) n
) g
JOIN chats c ON c.tenant_id = $1 AND c.user_id = g.user_id
"""

# The quota rows the settlements of those turns leave (daily `total` with its model split, the
# monthly `total`), as the engine's settlement statement would have added them up.
_DAILY_ROWS = """
INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket, spent_credits_micro,
                         calls, input_tokens, output_tokens, updated_at, by_model)
SELECT gen_random_uuid(), $1, user_id, 'daily', day, 'total', sum(credits), sum(turns), sum(tin),
       sum(tout), now(), jsonb_object_agg(model, jsonb_build_array(turns, tin, tout, credits))
FROM (
    SELECT requester_user_id AS user_id, period_daily AS day, effective_model AS model,
           count(*) AS turns,
           sum(CASE WHEN settlement_method = 'actual' THEN input_tokens ELSE 0 END) AS tin,
           sum(CASE WHEN settlement_method = 'actual' THEN output_tokens ELSE 0 END) AS tout,
           sum(committed_credits_micro) AS credits
    FROM chat_turns WHERE tenant_id = $1 GROUP BY 1, 2, 3
) m
GROUP BY user_id, day
"""

_MONTHLY_ROWS = """
INSERT INTO quota_usage (id, tenant_id, user_id, period_type, period_start, bucket, spent_credits_micro,
                         calls, input_tokens, output_tokens, updated_at)
SELECT gen_random_uuid(), tenant_id, user_id, 'monthly', date_trunc('month', period_start)::date, 'total',
       sum(spent_credits_micro), sum(calls), sum(input_tokens), sum(output_tokens), now()
FROM quota_usage WHERE tenant_id = $1 AND period_type = 'daily'
GROUP BY tenant_id, user_id, date_trunc('month', period_start)
"""

# The same report straight from the turns (what it would cost without the quota rows).
_FROM_TURNS = """
SELECT {keys}, count(*) AS turns,
       sum(CASE WHEN settlement_method = 'actual' THEN input_tokens ELSE 0 END)::bigint AS input_tokens,
       sum(CASE WHEN settlement_method = 'actual' THEN output_tokens ELSE 0 END)::bigint AS output_tokens,
       sum(committed_credits_micro)::bigint AS charged_credits_micro
FROM (SELECT requester_user_id AS user_id, period_daily AS day, effective_model AS model, settlement_method,
             input_tokens, output_tokens, committed_credits_micro
      FROM chat_turns WHERE tenant_id = $1 AND settled_at IS NOT NULL
        AND period_daily >= $2 AND period_daily <= $3) t
GROUP BY {keys} ORDER BY {keys} LIMIT $4
"""


async def fill(
    con: asyncpg.Connection, tenant_id: UUID, turns: int, users: int, days: int, first: date, chunk: int
) -> None:
    """One tenant's `turns` settled turns over `days` days from `first`, and their quota rows."""
    await con.execute(_CHATS, tenant_id, users)
    for start in range(0, turns, chunk):
        await con.execute(_TURNS, tenant_id, users, days, first, start, min(start + chunk, turns) - 1)
    await con.execute(_DAILY_ROWS, tenant_id)
    await con.execute(_MONTHLY_ROWS, tenant_id)
    await con.execute("ANALYZE chat_turns")
    await con.execute("ANALYZE quota_usage")


async def explain(con: asyncpg.Connection, sql: str, *args: Any) -> tuple[float, int, str]:
    """(execution ms, rows, plan text) of `EXPLAIN (ANALYZE, BUFFERS)` of one statement."""
    lines = [r[0] for r in await con.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)]
    execution = next(line for line in lines if line.startswith("Execution Time"))
    rows = await con.fetch(sql, *args)
    return float(execution.split()[2]), len(rows), "\n".join(lines)


_DAILY_COUNT = """
SELECT count(*) FROM quota_usage WHERE tenant_id = $1 AND period_type = 'daily' AND bucket = 'total'
"""


async def daily_rows(con: asyncpg.Connection, tenant_id: UUID) -> int:
    count: int = await con.fetchval(_DAILY_COUNT, tenant_id)
    return count


def from_turns_sql(keys: str) -> str:
    return _FROM_TURNS.format(keys=keys)
