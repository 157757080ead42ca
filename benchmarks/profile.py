"""Summarise a py-spy raw profile (``bench --profile DIR``): where the time went.

``python -m benchmarks.profile FILE [--top N] [--match TEXT]`` prints, for the N functions
with the most samples on the stack (inclusive), their share of all samples, and the share
in which they were the innermost frame (self). Idle samples (the event loop waiting in
``select``/``epoll``) are counted apart, so shares are of busy time.
"""

import argparse
import collections
from pathlib import Path

IDLE = ("select (selectors.py", "run_once (uvloop", "_run_once (asyncio/base_events.py")


def summarise(path: Path, top: int, match: str | None) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames or any(frames[-1].startswith(mark) for mark in IDLE):
            idle += count
            continue
        busy += count
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    rows = [f"busy samples {busy}, idle {idle} ({idle / max(1, busy + idle):.0%} idle)"]
    rows.append("| inclusive | self | function |")
    rows.append("| --- | --- | --- |")
    shown = 0
    for frame, count in inclusive.most_common():
        if match and match not in frame:
            continue
        rows.append(f"| {count / busy:.1%} | {own[frame] / busy:.1%} | `{frame}` |")
        shown += 1
        if shown >= top:
            break
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile")
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", help="only functions whose frame contains this text")
    args = parser.parse_args()
    print(summarise(args.file, args.top, args.match))


if __name__ == "__main__":
    main()
