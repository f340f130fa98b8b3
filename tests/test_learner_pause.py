"""pause-learning holds the learner's next batch, and its step-in-flight gauge tells whoever
paused when no step (or gate) is computing any more. Pure logic: the learner's step and its
lifecycle are stand-ins; the experiment's end-to-end test uses the real ones."""

import threading
from types import SimpleNamespace

from learner import metrics
from learner.consumer import PromptBatch
from learner.loop import Learner


class Flags:
    def __init__(self) -> None:
        self.learning_paused = False

    def state(self):
        return SimpleNamespace(learning_paused=self.learning_paused)


def in_flight() -> float:
    return metrics.STEP_IN_FLIGHT._value.get()


def test_a_pause_holds_the_next_batch_and_reports_no_step_in_flight():
    flags = Flags()
    stepping, release = threading.Event(), threading.Event()
    steps: list[PromptBatch] = []

    def step(batch, t0):
        assert in_flight() == 1  # computing counts as in flight
        steps.append(batch)
        stepping.set()
        release.wait(10)
        return "report"

    learner = Learner.__new__(Learner)
    batch = PromptBatch([], {"0": 3}, [])
    learner.source = SimpleNamespace(next_batch=lambda size, polls: batch)
    learner.lifecycle = flags
    learner.cfg = SimpleNamespace(learner=SimpleNamespace(batch_completions=16, group_size=8))
    learner._step = step

    # A step in flight when the pause comes runs to its end, then the gauge falls.
    first = threading.Thread(target=learner.step_once)
    first.start()
    assert stepping.wait(10)
    flags.learning_paused = True
    assert in_flight() == 1
    release.set()
    first.join(10)
    assert in_flight() == 0 and len(steps) == 1

    # The next batch is read but held: no step starts while paused.
    stepping.clear()
    second = threading.Thread(target=learner.step_once)
    second.start()
    assert not stepping.wait(1.5)  # negative check: the step must not start within the pause
    assert in_flight() == 0 and len(steps) == 1
    flags.learning_paused = False
    assert stepping.wait(10)
    second.join(10)
    assert steps == [batch, batch] and in_flight() == 0
