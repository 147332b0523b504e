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
import os
import random
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import asyncpg
from aiokafka.errors import KafkaError
from asyncpg.exceptions import _base as asyncpg_base

from minichat.settings import Settings
from minichat.storage.db import RetryableConflict

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Action(enum.Enum):
    RETRY = "retry"
    ISOLATE = "isolate"
    """The database refused what a record carries: find that record, dead-letter it, go on."""
    CRASH = "crash"


_REFUSED_CONTENT: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # class 22: out of range, bad value
    asyncpg.IntegrityConstraintViolationError,  # class 23: a check, not-null or unique constraint
    asyncpg_base.DataError,  # client side: a parameter the column's type cannot encode (int32 range)
)


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
    # A connection that died under a query: asyncpg raises these client-side classes for it. A
    # real misuse would also land here, and then crashes the worker once the retries give up.
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_TRANSIENT: tuple[type[BaseException], ...] = (
    *_TRANSIENT_DB,
    RetryableConflict,
    OSError,
    asyncio.TimeoutError,
    TimeoutError,
)

RETRIED_CLASSES: tuple[str, ...] = tuple(
    sorted({c.__name__ for c in _TRANSIENT} | {"ConnectionRefusedError", "ConnectionResetError"})
)
"""The error classes a batch is retried on, as `minichat_batch_retries_total` labels them."""


def classify(exc: BaseException) -> Action:
    # Refused content first: asyncpg's client-side DataError is also an InterfaceError.
    if isinstance(exc, _REFUSED_CONTENT):
        return Action.ISOLATE
    if isinstance(exc, _TRANSIENT):
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

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(max_backoff_s=settings.retry_max_backoff_s, give_up_after_s=settings.retry_give_up_s)


def dependency_of(exc: BaseException) -> str:
    """The dependency a transient failure most likely came from, for log lines.

    Kafka clients raise `KafkaError`s; what else is transient here (asyncpg's classes, OS-level
    connection errors, statement timeouts) comes from the database.
    """
    return "Kafka" if isinstance(exc, KafkaError) else "PostgreSQL"


async def with_retries(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    dependency: str | None = None,
    clock: Callable[[], float] | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run `attempt` until it succeeds; transient failures back off, anything else propagates
    (refused content too: retrying cannot change the record).

    After `policy.give_up_after_s` of failures it raises `GaveUp`, naming the dependency (given,
    or guessed from the error). Log lines name the error class only, never its text: an error
    can quote the statement's parameters.
    """
    now = clock or asyncio.get_running_loop().time
    started = now()
    backoff = policy.initial_s
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except Exception as exc:
            if classify(exc) is not Action.RETRY:
                raise
            waited = now() - started
            name = dependency or dependency_of(exc)
            if waited >= policy.give_up_after_s:
                raise GaveUp(
                    f"{what}: {name} still failing after {waited:.0f} s ({tries} tries, "
                    f"last error {type(exc).__name__}); giving up after {policy.give_up_after_s:g} s"
                ) from exc
            if on_retry is not None:
                on_retry(exc)
            # Never sleep past the budget: the last try happens when it runs out.
            delay = min(backoff * (0.5 + random.random() / 2), policy.give_up_after_s - waited)
            logger.warning(
                "%s failed on %s (%s), retry %d in %.2f s (gives up after %g s)",
                what,
                name,
                type(exc).__name__,
                tries,
                delay,
                policy.give_up_after_s,
            )
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, policy.max_backoff_s)


# Exit status when work can neither be done nor retried any longer.
EXIT_FATAL = 70


def failure_report(exc: BaseException) -> str:
    """An unexpected failure for a log line: its class, SQLSTATE and where it was raised, for it
    and its causes, never their text (a database error's message or DETAIL can quote a row, and
    rows hold message content; so can a trigger's RAISE)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 5:
        sqlstate = getattr(seen, "sqlstate", None)
        where = "".join(traceback.format_tb(seen.__traceback__)).rstrip()
        parts.append(
            f"{type(seen).__name__}" + (f" (sqlstate {sqlstate})" if sqlstate else "") + f"\n{where}"
        )
        seen = seen.__cause__ or seen.__context__
    return (
        "\nwhich came from ".join(parts) + "\n(the error's text is not logged: it can carry message content)"
    )


def stop_worker(name: str, exc: BaseException) -> NoReturn:
    """Leave at once, without letting faust commit offsets of a batch that was not applied.

    faust acks a batch when the loop body exits, even by an exception, and commits acked offsets
    on a graceful stop: raising or crashing the app could skip the batch. Exiting the process is
    the same as a SIGKILL, which the design survives: the batch is consumed again on restart.
    """
    if isinstance(exc, GaveUp):
        logger.critical("%s: stopping the worker (exit %d): %s", name, EXIT_FATAL, exc)
    else:
        logger.critical("%s: stopping the worker (exit %d): %s", name, EXIT_FATAL, failure_report(exc))
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_FATAL)
