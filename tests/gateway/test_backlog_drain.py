"""The overload estimate uses the drain rate measured under a line (gateway/tasks/backlog.py)."""

from gateway.tasks.backlog import DRAIN_MIN_SPAN_SECONDS, DrainMeter, ModelLoad


def test_the_drain_rate_is_measured_only_under_an_unbroken_line() -> None:
    meter = DrainMeter()
    # No line yet: the counter moves at the arrival rate, which says nothing of capacity.
    assert meter.observe("m", 0.0, 0, line=False) is None
    assert meter.observe("m", 5.0, 50, line=False) is None
    # A line forms at t=10; its rate is known once it is DRAIN_MIN_SPAN_SECONDS old.
    assert meter.observe("m", 10.0, 100, line=True) is None
    assert meter.observe("m", 10.0 + DRAIN_MIN_SPAN_SECONDS - 1, 190, line=True) is None
    rate = meter.observe("m", 10.0 + DRAIN_MIN_SPAN_SECONDS, 200, line=True)
    assert rate == 100 / DRAIN_MIN_SPAN_SECONDS
    # A break in the line starts the measurement again.
    assert meter.observe("m", 30.0, 250, line=False) is None
    assert meter.observe("m", 31.0, 260, line=True) is None
    # Models are measured apart.
    assert meter.observe("other", 31.0, 0, line=True) is None


def test_a_stall_or_a_restarted_counter_gives_no_rate() -> None:
    meter = DrainMeter()
    meter.observe("m", 0.0, 500, line=True)
    assert meter.observe("m", 20.0, 500, line=True) is None  # nothing finished: a stall
    # Redis lost the counter: it starts from zero again, and so does the measurement.
    assert meter.observe("m", 21.0, 3, line=True) is None
    assert meter.observe("m", 31.0, 53, line=True) == 5.0


def test_old_samples_leave_the_window() -> None:
    meter = DrainMeter()
    meter.observe("m", 0.0, 0, line=True)
    meter.observe("m", 50.0, 5000, line=True)  # fast at first
    # 100 s in, only the last 60 s count: 1,000 jobs over 50 s.
    assert meter.observe("m", 100.0, 6000, line=True) == 20.0


def test_a_slow_drain_lengthens_the_estimate_a_fast_one_does_not_shorten_it() -> None:
    by_slots = ModelLoad(open_tasks=319, slots=32, job_seconds=1.0)
    assert by_slots.finish_seconds(0) == 10.0
    # Workers finishing 10 jobs/s, not 32: the 320th task in line needs 32 s.
    slow = ModelLoad(open_tasks=319, slots=32, job_seconds=1.0, drain_per_second=10.0)
    assert slow.finish_seconds(0) == 32.0
    assert slow.finish_seconds(10) == 33.0
    fast = ModelLoad(open_tasks=319, slots=32, job_seconds=1.0, drain_per_second=64.0)
    assert fast.finish_seconds(0) == 10.0
