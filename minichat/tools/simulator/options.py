"""`minichat simulate`'s options."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimulateOptions:
    tenants: int = 4
    users_per_tenant: int = 5
    chats_per_user: int = 3
    turns_per_chat: int = 4
    seed: int | None = None
    """None: a random seed (printed, so the run can be repeated)."""
    timeout: float = 120.0
    """Seconds to wait, after the traffic, for the processor to settle everything."""
    step_timeout: float = 30.0
    """Seconds to wait for one decision, or for one turn to leave `running`."""
    concurrency: int = 32
    """Chats played at the same time."""
    wait_for_terminal: bool = False
    """Send a chat's next command only once the processor applied the previous turn's terminal
    event (a polite gateway), instead of as soon as the broker acknowledged it."""
