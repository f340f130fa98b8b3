"""The learner's requests take turns behind users' (serving/rollout.py UsersFirst): on main,
the learner's self-scores held a user's 32-token chat for the whole 11-16 s reward phase
(bench/results/users_first_engine.json). A turn starts only once no user's request is in flight
(serving/limits.py's count, the one the per-client limits keep), the learner's prompt tokens in
flight stay within the budget (a prompt over it runs alone), and a hold that runs out lets the
learner move on a server never idle of users."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from serving.limits import ClientLimits
from serving.rollout import UsersFirst


def limits() -> ClientLimits:
    return ClientLimits(max_concurrent=4, rate_per_s=100, burst=100, max_in_flight=16)


def expired() -> float:
    return REGISTRY.get_sample_value("dynalign_rollout_hold_expired_total") or 0.0


async def take_turn(
    turns: UsersFirst, started: list[str], name: str, until: asyncio.Event, tokens: int = 700
):
    async with turns.turn(tokens):
        started.append(name)
        await until.wait()


def test_a_turn_waits_for_users_in_flight_and_starts_when_the_last_one_ends():
    async def scenario():
        users = limits()
        turns = UsersFirst(prefill_tokens=2048, max_hold_s=60, users_idle=users.idle)
        first, second = users.admit("alice"), users.admit("bob")
        started, done = [], asyncio.Event()
        learner = asyncio.create_task(take_turn(turns, started, "rollout", done))
        await asyncio.sleep(0)  # the learner's request has asked for its turn
        first.release()
        for _ in range(10):
            await asyncio.sleep(0)
        assert started == [], "bob's request is still in flight"
        second.release()
        await _until(lambda: started)
        done.set()
        await learner

    asyncio.run(scenario())


def test_the_learners_prompt_tokens_in_flight_stay_within_the_budget():
    async def scenario():
        # Self-scores of ~700 prompt tokens: two fit in 2048, a third waits.
        turns = UsersFirst(prefill_tokens=2048, max_hold_s=60, users_idle=limits().idle)
        started, done = [], asyncio.Event()
        tasks = [
            asyncio.create_task(take_turn(turns, started, f"score-{i}", done)) for i in range(5)
        ]
        await _until(lambda: len(started) == 2)
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(started) == 2, started
        done.set()
        await asyncio.gather(*tasks)
        assert len(started) == 5

    asyncio.run(scenario())


def test_a_hold_that_runs_out_starts_the_turn_beside_users_and_is_counted():
    async def scenario():
        users = limits()
        turns = UsersFirst(prefill_tokens=2048, max_hold_s=0.05, users_idle=users.idle)
        users.admit("alice")  # never released: a server never idle of users
        before = expired()
        started, done = [], asyncio.Event()
        done.set()
        await asyncio.wait_for(take_turn(turns, started, "rollout", done), 5)
        assert started == ["rollout"] and expired() == before + 1

    asyncio.run(scenario())


def test_a_prompt_over_the_whole_budget_runs_alone_and_zero_means_no_budget():
    async def scenario():
        turns = UsersFirst(prefill_tokens=2048, max_hold_s=60, users_idle=limits().idle)
        started, done = [], asyncio.Event()
        tasks = [
            asyncio.create_task(take_turn(turns, started, f"long-{i}", done, tokens=5000))
            for i in range(2)
        ]
        await _until(lambda: started)
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(started) == 1, started
        done.set()
        await asyncio.gather(*tasks)

        turns = UsersFirst(prefill_tokens=0, max_hold_s=60, users_idle=limits().idle)
        started, done = [], asyncio.Event()
        tasks = [
            asyncio.create_task(take_turn(turns, started, f"score-{i}", done)) for i in range(8)
        ]
        await _until(lambda: len(started) == 8)
        done.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


async def _until(condition) -> None:
    """Until `condition()` holds, giving the loop's other tasks their turns; 5 s at most."""

    async def spin():
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), 5)


def test_a_prompts_tokens_are_estimated_from_its_text_parts_too():
    from serving.rollout import prompt_tokens
    from shared.vllm_compat import ChatCompletionRequest

    parts = [{"type": "text", "text": "x" * 400}, {"type": "text", "text": "y" * 400}]
    request = ChatCompletionRequest(
        model="dynalign",
        messages=[{"role": "system", "content": "z" * 800}, {"role": "user", "content": parts}],
    )
    assert prompt_tokens(request) == 1600 // 4 + 2 * 4
