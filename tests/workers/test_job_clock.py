"""When the worker polls an upstream job (workers/job_clock.py): every interval until the
channel's jobs of a model have a duration, then around their expected end."""

import pytest

from workers.job_clock import SAMPLES, JobClock

INTERVAL = 1.0
STEP = INTERVAL / 4


def test_with_no_sample_the_polls_come_every_interval() -> None:
    clock = JobClock()
    assert clock.expected("ch", "m") is None
    assert [clock.pause("ch", "m", INTERVAL, elapsed) for elapsed in (0, 1, 2.5)] == [1, 1, 1]


def test_a_sample_is_the_middle_of_the_bracket_the_polls_put_the_end_in() -> None:
    clock = JobClock()
    clock.record("ch", "m", running_until=6.0, final_at=7.0)
    assert clock.expected("ch", "m") == 6.5
    # Another channel, or another model, learns on its own.
    assert clock.expected("other", "m") is None
    assert clock.expected("ch", "other") is None


def test_polls_wait_for_the_expected_end_then_step_then_fall_back_to_the_interval() -> None:
    clock = JobClock()
    clock.record("ch", "m", running_until=9.5, final_at=10.5)  # expected: 10 s
    assert clock.pause("ch", "m", INTERVAL, 0.0) == pytest.approx(10 - STEP)
    assert clock.pause("ch", "m", INTERVAL, 4.0) == pytest.approx(6 - STEP)
    # From a step before the expected end to an interval past it: every step.
    assert clock.pause("ch", "m", INTERVAL, 10 - STEP) == STEP
    assert clock.pause("ch", "m", INTERVAL, 10.5) == STEP
    # A job that runs long is polled as if there were no sample.
    assert clock.pause("ch", "m", INTERVAL, 11.0) == INTERVAL
    assert clock.pause("ch", "m", INTERVAL, 40.0) == INTERVAL


def test_the_shortest_recent_job_sets_the_expected_end_and_old_ones_are_forgotten() -> None:
    clock = JobClock()
    clock.record("ch", "m", 1.0, 2.0)  # 1.5 s: the quickest
    clock.record("ch", "m", 4.0, 5.0)
    assert clock.expected("ch", "m") == 1.5
    for _ in range(SAMPLES - 1):
        clock.record("ch", "m", 4.0, 5.0)
    # The quick one is SAMPLES jobs old: gone.
    assert clock.expected("ch", "m") == 4.5
    # A job found final at its first poll brackets its end from the submit: the upstream
    # sped up, and the next jobs are polled sooner at once.
    clock.record("ch", "m", 0.0, 3.0)
    assert clock.expected("ch", "m") == 1.5
