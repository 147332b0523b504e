"""`minichat simulate`: a gateway simulator that plays realistic traffic through the real stack.

Two halves:

- `make_plan(...)` is pure and deterministic for a seed: tenants, users, chats and, per chat, the
  steps a gateway will play (turn requests, the provider's answer and usage, retries, edits,
  deletes, duplicates, out-of-order and early events). It covers every scenario kind of
  `SCENARIO_KINDS` once the plan has at least `MIN_TURNS_FOR_COVERAGE` turns, plus one user of the
  demo tenant (limits from `demo_policy.yaml`) who keeps asking until quota runs out.
- `run_simulation(settings, options)` plays the plan: each chat is an asyncio task (bounded), which
  sends a command on `turn-requests`, waits for its `turn.decision` (read from `turn-decisions`,
  matched on `command_event_id`), and for an accepted turn plays the provider side on
  `provider-responses` and `usage`, and sends the chat's next command as soon as the broker
  acknowledged the turn's terminal event (a real gateway's pace: the processor applies a chat's
  facts before its later commands however far behind it is; `wait_for_terminal` waits, polling the
  database, until the processor applied the terminal event instead). Then it waits until the
  processor is quiescent. Ids are fresh per run (a rerun never collides); choices come from the seed.

Message content is generated text; it is produced to Kafka and never logged or printed.

The modules: `scenarios.py` (what traffic is made of) and `plan.py` (a run drawn from it) are pure;
`script.py` turns a step into records; `play.py` plays them through the client, `watch.py` polls
the database for the chats that wait, `run.py` ties a run together and prints it.
"""

from minichat.tools.simulator.options import SimulateOptions
from minichat.tools.simulator.plan import ChatPlan, DeleteStep, Plan, Step, TokenPlan, TurnStep, make_plan
from minichat.tools.simulator.run import (
    SetupError,
    SimulationResult,
    render_traffic,
    run_simulation,
    simulate,
)
from minichat.tools.simulator.scenarios import (
    DEMO_POLICY,
    DEMO_TENANT_ID,
    FAILURE_CODES,
    LIMIT_CHATS,
    LIMIT_TURNS,
    MIN_TURNS_FOR_COVERAGE,
    OVERSHOOT_INPUT_TOKENS,
    SCENARIO_KINDS,
    Outcome,
)
from minichat.tools.simulator.script import Record, Script, provider_script, turn_command

__all__ = [
    "DEMO_POLICY",
    "DEMO_TENANT_ID",
    "FAILURE_CODES",
    "LIMIT_CHATS",
    "LIMIT_TURNS",
    "MIN_TURNS_FOR_COVERAGE",
    "OVERSHOOT_INPUT_TOKENS",
    "SCENARIO_KINDS",
    "ChatPlan",
    "DeleteStep",
    "Outcome",
    "Plan",
    "Record",
    "Script",
    "SetupError",
    "SimulateOptions",
    "SimulationResult",
    "Step",
    "TokenPlan",
    "TurnStep",
    "make_plan",
    "provider_script",
    "render_traffic",
    "run_simulation",
    "simulate",
    "turn_command",
]
