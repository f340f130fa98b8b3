"""What `dynalign up` starts beside its server: kept running while it runs, ended with it.

- `ending_descendants()`: on Ctrl-C, SIGTERM or any exit, every process started inside ends.
- `shared.process.die_with_parent` on each child, so that a SIGKILL of `up` (the OOM killer's
  usual pick: it holds the engine), which runs no cleanup, still ends the learner and the broker.
- `Supervisor`: a child that exits while `up` runs is logged, counted
  (dynalign_up_restarts_total{process}), started again after a back-off, and shown in the
  server's /health body; a dead learner would otherwise leave the server on its last adapter
  forever with nobody told.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass

from prometheus_client import Counter

log = logging.getLogger("dynalign.up")

RESTARTS = Counter(
    "dynalign_up_restarts_total",
    "Children of `dynalign up` started again after they exited (learner).",
    ["process"],
)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
# A child that ran this long before it exited starts again after the first back-off: it was
# not crash-looping.
HEALTHY_RUN_S = 120.0
POLL_S = 0.5


@dataclass
class Child:
    """One supervised process; `spawn` starts it (with preexec_fn=die_with_parent)."""

    name: str
    spawn: Callable[[], subprocess.Popen]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    last_exit: int | None = None
    next_start: float | None = None  # set while it waits out its back-off
    backoff_s: float = FIRST_BACKOFF_S

    def start(self, now: float) -> None:
        self.process = self.spawn()
        self.started_at, self.next_start = now, None
        self.backoff_s = max(self.backoff_s, FIRST_BACKOFF_S)

    def details(self) -> dict:
        running = self.process is not None and self.process.poll() is None
        return {
            "state": "running" if running else "starting",
            "pid": self.process.pid if running else None,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit,
        }


class Supervisor:
    """Its children are started, watched, restarted and stopped by one thread of its own: the
    thread their PR_SET_PDEATHSIG is tied to, alive until they are stopped."""

    def __init__(self, stop_timeout_s: float = 60.0) -> None:
        self._children: list[Child] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stop_timeout_s = stop_timeout_s
        self._thread = threading.Thread(target=self._run, name="up-supervisor", daemon=True)

    def add(self, name: str, spawn: Callable[[], subprocess.Popen]) -> None:
        """Start `spawn()`'s process (within POLL_S) and keep it running."""
        with self._lock:
            self._children.append(Child(name, spawn, next_start=0.0, backoff_s=0.0))
        if not self._thread.is_alive():
            self._thread.start()

    def details(self) -> dict:
        """For /health: each child's state, pid, restarts and last exit code."""
        with self._lock:
            return {c.name: c.details() for c in self._children}

    def stop(self) -> None:
        """No more restarts; each child SIGTERMed (its clean path), SIGKILLed past the timeout."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            with self._lock:
                for child in self._children:
                    self._tend(child, now)
        with self._lock:
            children = list(self._children)
        for child in reversed(children):  # the last started first, as an ExitStack would
            if child.process is not None:
                stop_child(child.process, self._stop_timeout_s)

    def _tend(self, child: Child, now: float) -> None:
        if child.next_start is not None:
            if now >= child.next_start:
                if child.process is not None:
                    child.restarts += 1
                    RESTARTS.labels(child.name).inc()
                    log.warning(
                        "up: starting the %s again (restart %d)", child.name, child.restarts
                    )
                try:
                    child.start(now)
                except OSError as exc:
                    log.error("up: could not start the %s: %s", child.name, exc)
                    self._schedule(child, now)
            return
        code = child.process.poll()
        if code is None:
            return
        child.last_exit = code
        if now - child.started_at >= HEALTHY_RUN_S:
            child.backoff_s = FIRST_BACKOFF_S
        self._schedule(child, now)
        log.error(
            "up: the %s (pid %d) exited with code %d after %.0f s; starting it again in %.0f s",
            child.name,
            child.process.pid,
            code,
            now - child.started_at,
            child.next_start - now,
        )

    @staticmethod
    def _schedule(child: Child, now: float) -> None:
        child.next_start = now + child.backoff_s
        child.backoff_s = min(child.backoff_s * 2, MAX_BACKOFF_S)


def stop_child(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (a learner's clean path: its checkpoint written), SIGKILL past `timeout_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def ending_descendants() -> Iterator[tuple[ExitStack, threading.Event]]:
    """Every process started inside ends with this one (a vLLM engine core left behind holds
    ~700 MB and a core). SIGTERM, how containers are stopped, takes Ctrl-C's path: it sets the
    yielded event and raises KeyboardInterrupt. The event is for loops to check too: pyzmq's poll,
    where vLLM waits while its engine starts, drops the KeyboardInterrupt.

    On any exit the cleanups registered on the yielded stack run, further signals ignored so a
    second Ctrl-C cannot cut them short; then whatever descendant is still alive is ended."""
    import psutil

    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with ExitStack() as cleanups:
        try:
            yield cleanups, stopping
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            me = psutil.Process()
            descendants = me.children(recursive=True)  # before a cleanup can orphan any
            try:
                cleanups.close()
            finally:
                _end(
                    p
                    for p in {*descendants, *me.children(recursive=True)}
                    if p.is_running() and not _exits_with_us(p)
                )


def _exits_with_us(process) -> bool:
    """multiprocessing's resource tracker ignores SIGTERM; it cleans up and exits once the
    processes sharing its pipe (we and our engine's) are gone."""
    import psutil

    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return True


def _end(processes: Iterable, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL to what is still running after `grace_s`."""
    import psutil

    processes = list(processes)
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        log.warning("killing pid %d, still running %ss after SIGTERM", process.pid, grace_s)
        with suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
