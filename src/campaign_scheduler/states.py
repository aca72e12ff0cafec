"""The node state machine: which transitions exist. Pure, no I/O.

PENDING --run--> RUNNING --ok--> COMPLETED
   ^                |--error, attempts left--> PENDING (retried by BullMQ with backoff)
   |                |--error, last attempt / non-retryable--> FAILED
   |                `--worker lost (stall / reconciler)--> RUNNING (taken over, same job id)
RUNNING --filter not matched yet--> WAITING --matched--> COMPLETED
PENDING, RUNNING or WAITING --timeout--> TIMEOUT
PENDING, RUNNING or WAITING --cancel--> CANCELLED
FAILED --manual retry--> PENDING
"""

from __future__ import annotations

from enum import StrEnum


class NodeState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    WAITING = "WAITING"  # a Filter waiting for a match or its deadline
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"


TERMINAL: frozenset[NodeState] = frozenset(
    {NodeState.COMPLETED, NodeState.FAILED, NodeState.TIMEOUT, NodeState.CANCELLED}
)
ACTIVE: frozenset[NodeState] = frozenset({NodeState.PENDING, NodeState.RUNNING, NodeState.WAITING})

# (from, to) pairs that a guarded update may perform. None as `from` is the row's creation.
ALLOWED: frozenset[tuple[NodeState | None, NodeState]] = frozenset(
    {
        (None, NodeState.PENDING),
        (NodeState.PENDING, NodeState.PENDING),  # rescheduled to another run time
        (NodeState.PENDING, NodeState.RUNNING),
        (NodeState.RUNNING, NodeState.RUNNING),  # a stalled job taken over by another worker
        (NodeState.RUNNING, NodeState.COMPLETED),
        (NodeState.RUNNING, NodeState.PENDING),
        (NodeState.RUNNING, NodeState.FAILED),
        (NodeState.RUNNING, NodeState.WAITING),
        (NodeState.WAITING, NodeState.COMPLETED),
        (NodeState.WAITING, NodeState.TIMEOUT),
        (NodeState.WAITING, NodeState.CANCELLED),
        (NodeState.PENDING, NodeState.TIMEOUT),
        (NodeState.RUNNING, NodeState.TIMEOUT),
        (NodeState.PENDING, NodeState.CANCELLED),
        (NodeState.RUNNING, NodeState.CANCELLED),
        (NodeState.FAILED, NodeState.PENDING),
    }
)


def check_transition(src: NodeState | None, dst: NodeState) -> None:
    """Raise ValueError for a transition the machine does not have (a programming error)."""
    if (src, dst) not in ALLOWED:
        raise ValueError(f"no transition {src} -> {dst} in the node state machine")


class CampaignState(StrEnum):
    PENDING = "PENDING"  # draft
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    STOPPED = "STOPPED"
    ERROR = "ERROR"
