"""The one classifier of failures inside an agent: retry with backoff, or crash the worker.

Bad records never reach here: they are dead-lettered while decoding. What is left is either a
dependency that is briefly away (retry the whole batch: its transaction rolled back) or a bug or
an outage too long to wait for (crash, so the orchestrator restarts the worker and nothing is
skipped: faust would ack a batch whose handler raised).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from aiokafka.errors import KafkaError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Action(enum.Enum):
    RETRY = "retry"
    CRASH = "crash"


# SQLSTATE classes, matched by asyncpg exception class, never by message text.
_TRANSIENT_DB: tuple[type[BaseException], ...] = (
    asyncpg.SerializationError,  # 40001
    asyncpg.DeadlockDetectedError,  # 40P01
    asyncpg.LockNotAvailableError,  # 55P03
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.CannotConnectNowError,  # 57P03 (starting up / shutting down)
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.QueryCanceledError,  # 57014 (statement timeout)
)


def classify(exc: BaseException) -> Action:
    if isinstance(exc, _TRANSIENT_DB | OSError | asyncio.TimeoutError | TimeoutError):
        return Action.RETRY
    if isinstance(exc, KafkaError) and getattr(exc, "retriable", False):
        return Action.RETRY
    return Action.CRASH


class GaveUp(RuntimeError):
    """A dependency stayed away longer than the retry budget: the worker must stop, not skip."""


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.05
    max_backoff_s: float = 5.0
    give_up_after_s: float = 120.0


async def with_retries(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    clock: Callable[[], float] | None = None,
) -> T:
    """Run `attempt` until it succeeds; transient failures back off, anything else propagates."""
    now = clock or asyncio.get_running_loop().time
    started = now()
    backoff = policy.initial_s
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except Exception as exc:
            if classify(exc) is Action.CRASH:
                raise
            waited = now() - started
            if waited >= policy.give_up_after_s:
                raise GaveUp(f"{what}: still failing after {waited:.0f}s and {tries} tries: {exc!r}") from exc
            logger.warning("%s failed (%s), retry %d in %.2fs", what, type(exc).__name__, tries, backoff)
            await asyncio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, policy.max_backoff_s)
