"""The garbage collector and a long-running process: start-up objects are frozen.

A gateway or worker process holds about 170,000 objects from its start (the app, its
routes and schemas, the catalogue, the libraries' modules), and they never die. Python's
cyclic collector walks every one of them on each full (oldest-generation) collection:
about 60–270 ms with the event loop stopped, every few thousand requests, which is
where a read's p99 went. ``gc.freeze()`` moves them to a permanent generation the
collector does not walk; objects made afterwards (requests, tasks) are collected as
before. Called once a process has built everything it keeps (its app or job context);
only the first call in a process freezes.
"""

import gc
import logging

logger = logging.getLogger("tollgate.heap")


def freeze_startup_objects() -> None:
    """Collect what start-up left over, then exempt the survivors from later collections.

    Once per process: a process that builds apps again and again (the test suite) would
    otherwise freeze each one's objects for good, garbage-to-be included."""
    if gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()
    logger.debug("%d start-up objects frozen", gc.get_freeze_count())
