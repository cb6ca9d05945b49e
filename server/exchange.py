"""Send messages and collect their replies as soon as they arrive.

Flower 1.42's deployment grid (``HttpGrid``, the ServerApp of a real SuperLink) pulls replies
every 3 seconds in ``send_and_receive``, so every round, partition query and teacher check of a
deployed federation ended on the next multiple of 3 s after its last reply. Pushing and then
pulling with a short, growing wait (50 ms, doubling up to ``max_wait``, 0.2 s) returns within
``max_wait`` of the last reply. Grids without ``push_messages``/``pull_messages`` (the in-process
grid of the tests) keep their own ``send_and_receive``; the simulation's grid already pulls every
100 ms and behaves the same either way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message


def send_and_receive(grid, messages: Iterable[Message], timeout: float | None = None,
                     first_wait: float = 0.05, max_wait: float = 0.2) -> list[Message]:
    """Push ``messages``; their replies once all have come or ``timeout`` seconds have passed (None: no limit).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    messages : iterable of Message
        Their ``message_id`` is set by the push (as with ``grid.send_and_receive``).
    timeout : float, optional
    first_wait, max_wait : float
        Seconds between pulls: ``first_wait``, doubling up to ``max_wait``.
    """
    if not (hasattr(grid, "push_messages") and hasattr(grid, "pull_messages")):
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    wait = first_wait
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(wait if deadline is None else max(0.0, min(wait, deadline - time.monotonic())))
        wait = min(2 * wait, max_wait)
    return replies
