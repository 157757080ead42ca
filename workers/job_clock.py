"""When to poll an upstream job: just before and just after it is expected to end.

A slot on an upstream account is held from a job's submit until a poll sees the job
end, so a poll every ``interval`` keeps each slot busy half an interval past the job's
real end on average (a ninth of the capacity, with 1 s jobs polled every 0.25 s), and
asks many times while the job surely runs. The clock learns, per channel and model,
how long jobs take, and spends its polls around the end instead.

- **A sample** is the midpoint of the bracket a completed job's polls put its end in: the
  last poll that found it running and the first that found it final, counted from the
  submit's answer (a job found final at its first poll gives the bracket from the
  submit). The last ``SAMPLES`` are kept per (channel, model), in this process.
- **Expected end:** the shortest kept sample. A job rarely ends before the quickest
  recent one; if the upstream speeds up, the next sample is shorter at once.
- **Pauses:** with no sample, every ``interval`` from the submit (as without the
  clock). Otherwise one pause until a ``step`` (a quarter interval) before the expected
  end, polls every ``step`` until an interval past it, then every ``interval`` again:
  a job that runs long costs about five extra polls, never a stalled task.
- A resumed job (submitted by an earlier attempt) has no known submit: it is polled
  every ``interval`` and gives no sample.
"""

from collections import deque
from dataclasses import dataclass, field
from typing import Final

SAMPLES: Final = 16
STEPS_PER_INTERVAL: Final = 4


@dataclass
class JobClock:
    """Jobs' recent durations per (channel, model); shared by a worker's runs."""

    _samples: dict[tuple[str, str], deque[float]] = field(default_factory=dict)

    def expected(self, channel: str, model: str) -> float | None:
        """Seconds from submit to the expected end; None before any sample."""
        samples = self._samples.get((channel, model))
        return min(samples) if samples else None

    def record(self, channel: str, model: str, running_until: float, final_at: float) -> None:
        """One job's end lay between ``running_until`` and ``final_at`` (seconds since
        its submit's answer)."""
        samples = self._samples.setdefault((channel, model), deque(maxlen=SAMPLES))
        samples.append((running_until + final_at) / 2)

    def pause(self, channel: str, model: str, interval: float, elapsed: float) -> float:
        """Seconds to wait before the next poll, ``elapsed`` seconds after the submit."""
        expected = self.expected(channel, model)
        if expected is None or elapsed >= expected + interval:
            return interval
        step = interval / STEPS_PER_INTERVAL
        return max(expected - step - elapsed, step)
