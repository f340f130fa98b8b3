"""`dynalign up`'s supervision (dynalign/supervisor.py) on real child processes: a child that
exits is started again after a back-off that doubles while it keeps failing, counted and shown;
stopping ends the children; a child started with shared.process.die_with_parent ends when its
parent is SIGKILLed, which runs none of the parent's cleanup."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
from prometheus_client import REGISTRY

from dynalign import supervisor as sv
from shared.process import die_with_parent


def python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], preexec_fn=die_with_parent)


def restarts_counted(name: str) -> float:
    return REGISTRY.get_sample_value("dynalign_up_restarts_total", {"process": name}) or 0.0


def wait_for(condition, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.1)  # polling a process table: nothing to wait on
    return result


def test_a_child_that_exits_is_started_again_counted_and_shown():
    supervisor = sv.Supervisor()
    before = restarts_counted("crasher")
    supervisor.add("crasher", lambda: python("import sys; sys.exit(3)"))
    try:
        wait_for(lambda: supervisor.details()["crasher"]["restarts"] >= 2, "two restarts")
        details = supervisor.details()["crasher"]
        assert details["last_exit_code"] == 3
        assert restarts_counted("crasher") - before == details["restarts"]
    finally:
        supervisor.stop()


def test_stop_ends_the_children_on_their_clean_path():
    supervisor = sv.Supervisor()
    supervisor.add("sleeper", lambda: python("import time; time.sleep(600)"))
    pid = wait_for(lambda: supervisor.details()["sleeper"]["pid"], "the child running")
    process = psutil.Process(pid)
    supervisor.stop()
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    assert supervisor.details()["sleeper"]["state"] == "starting"  # not running any more


def test_a_child_ends_when_its_parent_is_sigkilled():
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from shared.process import die_with_parent\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
            " preexec_fn=die_with_parent)\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = psutil.Process(int(parent.stdout.readline()))
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone, alive = psutil.wait_procs([child], timeout=10)
    for leftover in alive:
        leftover.kill()
    assert gone and not alive


class Exited:
    """A process that has exited with `code` (the back-off logic needs nothing else)."""

    pid = 1

    def __init__(self, code: int) -> None:
        self.code = code

    def poll(self) -> int:
        return self.code


def test_the_back_off_doubles_while_a_child_keeps_failing_and_resets_after_a_healthy_run():
    supervisor = sv.Supervisor()
    child = sv.Child("c", lambda: Exited(1))
    now = 0.0
    child.start(now)
    delays = []
    for _ in range(8):  # exit at once, wait out the back-off, start again
        supervisor._tend(child, now)
        delays.append(child.next_start - now)
        now = child.next_start
        supervisor._tend(child, now)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert child.restarts == 8
    supervisor._tend(child, now + sv.HEALTHY_RUN_S)  # it ran long enough this time
    assert child.next_start - (now + sv.HEALTHY_RUN_S) == sv.FIRST_BACKOFF_S
