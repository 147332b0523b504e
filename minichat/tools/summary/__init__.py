"""What a deployment holds after traffic, and whether its money invariants hold.

`summarize(settings)` reads the database and the `billing-usage` and `dead-letters` topics once and
returns a `Summary` (with `spend_tenant`, that tenant's spend report as `GET /v1/usage` computes it,
checked against its settled turns); `render(summary)` prints it as plain aligned tables.
`wait_quiescent` polls until the processor has nothing left to do (every accepted turn settled, no
reserve held, every outbox row published, nothing parked, no input record left unconsumed) or a
deadline passes.

Money is integer micro-credits throughout; credits are shown by integer division, never floats.
Nothing here reads or prints message content.
"""

from minichat.tools.summary.books import (
    OK_LINE,
    AlertLine,
    Summary,
    TenantCredits,
    build_summary,
    check_invariants,
)
from minichat.tools.summary.quiescence import Backlog, wait_quiescent
from minichat.tools.summary.read import summarize
from minichat.tools.summary.render import render
from minichat.tools.summary.spend import SpendLine, SpendReport

__all__ = [
    "OK_LINE",
    "AlertLine",
    "Backlog",
    "SpendLine",
    "SpendReport",
    "Summary",
    "TenantCredits",
    "build_summary",
    "check_invariants",
    "render",
    "summarize",
    "wait_quiescent",
]
