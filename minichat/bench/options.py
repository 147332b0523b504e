"""What one `minichat bench` run measures: phases, sizes, rates (parsed by the command line)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

T = TypeVar("T")

PHASES: Final[tuple[str, ...]] = ("ceiling", "drain", "latency", "replay", "client")

TENANTS: Final = 5
"""Tenants of every generated population."""

TURNS_PER_CHAT: Final = 4
"""A population has about `turns / 4` chats ..."""

TURNS_PER_USER: Final = 40
"""... and about `turns / 40` users."""

CEILING_BATCH: Final = 500
CEILING_CONNECTIONS: Final = 2


@dataclass(frozen=True)
class BenchOptions:
    turns: int = 20_000
    rates: tuple[int, ...] = (100, 300, 1000, 3000)
    rate_seconds: float = 20.0
    workers: tuple[int, ...] = (1, 2)
    phases: tuple[str, ...] = PHASES
    out: Path | None = None
    seed: int = 1
    in_flight: int | None = None
    """Chats the drain's backlog plays at once, each from its first turn to its last (a gateway
    with that many sessions); None: half of the backlog's chats. The faust-agents engine's
    `generation_in_progress` share depends on it (docs/performance.md); an engine that orders the
    three topics as the contract says must refuse none, whatever it is."""
    ceiling_rounds: int = 3
    drain_timeout_s: float | None = None
    """None: 120 s plus 4 ms per event of the backlog."""
    client_requests: int = 200
    """Requests per gateway instance of the client-overhead phase."""
    catch_up_timeout_s: float = 300.0
    """How long the latency phase waits, after a rate, for the worker to answer everything."""
    idle_seconds: float = 10.0
    """How long the latency phase watches its caught-up worker with no traffic (its idle CPU)."""

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    def drain_deadline_s(self, events: int) -> float:
        return self.drain_timeout_s if self.drain_timeout_s is not None else 120.0 + events * 0.004


def parse_int_list(text: str, *, minimum: int = 1) -> tuple[int, ...]:
    """`"100,300"` -> `(100, 300)`; every value at least `minimum`."""
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or min(values) < minimum:
        raise ValueError(f"expected a comma-separated list of integers >= {minimum}, got {text!r}")
    return values


def parse_phases(text: str) -> tuple[str, ...]:
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PHASES]
    if not wanted or unknown:
        raise ValueError(f"phases are a comma-separated subset of {','.join(PHASES)}, got {text!r}")
    return tuple(p for p in PHASES if p in wanted)


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `minichat bench` options (the settings options are added by the command line)."""
    d = BenchOptions()
    add = parser.add_argument
    add(
        "--turns",
        type=_arg(_positive_int),
        default=d.turns,
        help=f"turns of the drain's backlog and events per ceiling round (default: {d.turns})",
    )
    add(
        "--rates",
        type=_arg(parse_int_list),
        default=d.rates,
        help="offered turn.requested per second of the latency phase (default: 100,300,1000,3000)",
    )
    add(
        "--rate-seconds",
        type=_arg(_positive_float),
        default=d.rate_seconds,
        help=f"seconds per rate (default: {d.rate_seconds:g})",
    )
    add(
        "--workers",
        type=_arg(parse_int_list),
        default=d.workers,
        help="worker process counts of the drain, one drain each (default: 1,2)",
    )
    add(
        "--phases",
        type=_arg(parse_phases),
        default=d.phases,
        help=f"what to run, a subset of {','.join(PHASES)} (default: all)",
    )
    add("--out", type=Path, default=None, help="also write the results as JSON to this file (default: none)")
    add(
        "--in-flight",
        type=_arg(_positive_int),
        default=None,
        help="chats the drain's backlog plays at once, each from its first turn to its last "
        "(default: half of the backlog's turns/4 chats; that many or more: all at once)",
    )
    add("--seed", type=int, default=d.seed, help=f"seed of the generated traffic (default: {d.seed})")
    add(
        "--client-requests",
        type=_arg(_positive_int),
        default=d.client_requests,
        help=f"requests per gateway instance of the client-overhead phase (default: {d.client_requests})",
    )
    _add_phase_arguments(add, d)


def _add_phase_arguments(add: Callable[..., object], d: BenchOptions) -> None:
    add(
        "--idle-seconds",
        type=_arg(_positive_float),
        default=d.idle_seconds,
        help=f"seconds the latency phase's worker is watched idle, before the first rate "
        f"(default: {d.idle_seconds:g})",
    )
    add(
        "--ceiling-rounds",
        type=_arg(_positive_int),
        default=d.ceiling_rounds,
        help=f"rounds of the ceiling, the median is reported (default: {d.ceiling_rounds})",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"must be above 0, got {text}")
    return value


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        turns=args.turns,
        rates=args.rates,
        rate_seconds=args.rate_seconds,
        workers=args.workers,
        phases=args.phases,
        out=args.out,
        seed=args.seed,
        in_flight=args.in_flight,
        ceiling_rounds=args.ceiling_rounds,
        client_requests=args.client_requests,
        idle_seconds=args.idle_seconds,
    )
