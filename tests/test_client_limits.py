"""Per-client limits and opt-out parsing as pure logic (the server tests drive them over HTTP)."""

from __future__ import annotations

import pytest

from serving.limits import ClientLimits, LimitExceeded
from serving.optout import OptOuts, parse_flag


def test_concurrency_is_per_client_and_permits_release_once():
    limits = ClientLimits(max_concurrent=2, rate_per_s=1000, burst=1000, max_in_flight=10)
    a1, a2 = limits.admit("a"), limits.admit("a")
    with pytest.raises(LimitExceeded) as refused:
        limits.admit("a")
    assert refused.value.reason == "concurrency" and refused.value.retry_after_s >= 1
    limits.admit("b")  # another client is not affected
    a1.release()
    a1.release()  # idempotent: a stream's finally and its finish may both release
    limits.admit("a")
    assert limits.in_flight == 3 and a2 is not None


def test_the_server_wide_bound_refuses_when_saturated():
    limits = ClientLimits(max_concurrent=5, rate_per_s=1000, burst=1000, max_in_flight=2)
    limits.admit("a"), limits.admit("b")
    with pytest.raises(LimitExceeded, match="capacity"):
        limits.admit("c")


def test_the_token_bucket_refills_at_the_rate(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("serving.limits.time.monotonic", lambda: now[0])
    limits = ClientLimits(max_concurrent=100, rate_per_s=2, burst=3, max_in_flight=100)
    for _ in range(3):
        limits.admit("a").release()
    with pytest.raises(LimitExceeded) as refused:
        limits.admit("a")
    assert refused.value.reason == "rate" and refused.value.retry_after_s == 1
    now[0] += 0.5  # one token back at 2/s
    limits.admit("a").release()


@pytest.mark.parametrize(
    "value, expected",
    [
        (False, False),
        ("False", False),
        ("0", False),
        (0, False),
        ("no", False),
        (" off ", False),
        (True, True),
        ("true", True),
        ("1", True),
        ("YES", True),
    ],
)
def test_flags_are_read_as_clients_spell_them(value, expected):
    assert parse_flag(value, "metadata.train") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, None, [], {"x": 1}])
def test_unrecognised_flags_are_refused_not_guessed(value):
    with pytest.raises(ValueError, match="metadata.train must be true or false"):
        parse_flag(value, "metadata.train")


def test_opted_out_conversations_survive_a_restart_and_stay_bounded(tmp_path):
    opt_outs = OptOuts(tmp_path, max_entries=3)
    opt_outs.add("c1", "c2")
    assert "c1" in OptOuts(tmp_path, max_entries=3)
    opt_outs.add("c3", "c4")
    again = OptOuts(tmp_path, max_entries=3)
    assert "c4" in again and "c1" not in again  # the newest max_entries are kept
