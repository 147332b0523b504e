"""Process-local counters and the worker's `/metrics` page (Prometheus text format).

Counters are per process (as Prometheus expects: it sums the workers); gauges that describe the
shared state (parked events, the outbox backlog, reserves held) are read from Postgres when the
page is scraped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

import asyncpg

from minichat.storage.metrics import StateGauges, state_gauges

Labels = tuple[tuple[str, str], ...]

_HELP = {
    "minichat_records_total": "Input records consumed, by topic and outcome (applied or dead_letter).",
    "minichat_dead_letters_total": "Records dead-lettered, by topic and error code.",
    "minichat_decisions_total": "turn.decision answers, by command, decision, error code and replay.",
    "minichat_turn_events_dropped_total": "Provider and usage events that changed nothing, by reason.",
    "minichat_batches_total": "Merged batches applied (one transaction each).",
    "minichat_batch_records_total": "Records in the merged batches applied.",
    "minichat_batch_steps_total": "Steps (runs of commands or of facts) the merged batches were cut into.",
    "minichat_events_parked_total": "Provider and usage events parked until their command is decided.",
    "minichat_parked_events": "Provider and usage events waiting for their command's decision.",
    "minichat_parked_oldest_age_seconds": "Age of the oldest parked event (0 when none).",
    "minichat_outbox_unpublished": "Billing events not yet relayed to billing-usage.",
    "minichat_reserved_credits_micro": "Credits reserved by running or unsettled turns, all tenants.",
}


class Metrics:
    def __init__(self) -> None:
        self._counters: Counter[tuple[str, Labels]] = Counter()

    def inc(self, name: str, amount: int = 1, **labels: str | None) -> None:
        key = tuple(sorted((k, "" if v is None else str(v)) for k, v in labels.items()))
        self._counters[(name, key)] += amount

    def value(self, name: str, **labels: str | None) -> int:
        key = tuple(sorted((k, "" if v is None else str(v)) for k, v in labels.items()))
        return self._counters[(name, key)]

    def render(self, gauges: StateGauges | None = None) -> str:
        lines: list[str] = []
        names = sorted({name for name, _ in self._counters})
        for name in names:
            lines += _header(name, "counter")
            for (n, labels), value in sorted(self._counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {value}")
        if gauges is not None:
            for gauge, reading in _gauge_values(gauges).items():
                lines += _header(gauge, "gauge")
                lines.append(f"{gauge} {reading}")
        return "\n".join(lines) + "\n"


def _header(name: str, kind: str) -> list[str]:
    return [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} {kind}"]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in labels
    )
    return "{" + escaped + "}"


def _gauge_values(g: StateGauges) -> Mapping[str, int | float]:
    return {
        "minichat_parked_events": g.parked_events,
        "minichat_parked_oldest_age_seconds": round(g.parked_oldest_age_s, 3),
        "minichat_outbox_unpublished": g.outbox_unpublished,
        "minichat_reserved_credits_micro": g.reserved_credits_micro,
    }


async def render_metrics(metrics: Metrics, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> str:
    db = await pool()
    async with db.acquire() as con:
        gauges = await state_gauges(con)
    return metrics.render(gauges)
