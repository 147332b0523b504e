"""A few seconds of micro-measurements that say how fast this machine is for this kind of work,
so two bench runs on different machines can be told apart: pure Python, TCP over loopback (what
every Kafka and PostgreSQL call of the worker pays), and a PostgreSQL round trip."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any

import asyncpg

from minichat.storage.db import ping


def python_loop_ms() -> float:
    """Best of 3: `sum(range(10_000_000))` in milliseconds."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(range(10_000_000))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def _echo(server: socket.socket) -> None:
    con, _ = server.accept()
    with con:
        while data := con.recv(65536):
            con.sendall(data)


def tcp_round_trip_us(rounds: int = 2000) -> float:
    """Median of 200-byte request/echo round trips over 127.0.0.1 (the echo is a thread)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        echo = threading.Thread(target=_echo, args=(server,), daemon=True)
        echo.start()
        with socket.create_connection(server.getsockname()) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(rounds):
                started = time.perf_counter()
                client.sendall(b"x" * 200)
                client.recv(65536)
                times.append(time.perf_counter() - started)
        echo.join(timeout=5)
    return round(statistics.median(times) * 1e6, 1)


async def pg_round_trip_us(database_url: str, rounds: int = 500) -> float:
    """Median of `SELECT 1` round trips on one asyncpg connection."""
    con = await asyncpg.connect(database_url)
    try:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            await ping(con)
            times.append(time.perf_counter() - started)
    finally:
        await con.close()
    return round(statistics.median(times) * 1e6, 1)


async def calibrate(database_url: str) -> dict[str, Any]:
    return {
        "python_sum_range_1e7_ms": python_loop_ms(),
        "tcp_loopback_round_trip_us": tcp_round_trip_us(),
        "pg_select_1_round_trip_us": await pg_round_trip_us(database_url),
    }
