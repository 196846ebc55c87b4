"""A save killed with SIGKILL at a chosen moment, in a forked child: what a power cut, the OOM killer or a
scheduler's pre-emption does to a process in the middle of writing a checkpoint."""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def killed(arm: Callable[[], None], act: Callable[[], None]) -> bool:
    """Run ``arm()`` (which patches the moment to die at) then ``act()`` in a forked child; True when the child
    died of SIGKILL (the moment came), False when ``act`` finished first."""
    pid = os.fork()
    if pid == 0:  # the child never returns into the test
        code = 0
        try:
            arm()
            act()
        except BaseException:  # noqa: BLE001 - an error is not the kill the test wants
            traceback.print_exc()
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3:
        raise AssertionError("the save failed with an error in the child instead of being killed")
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
