"""Generation tasks: their records, their public shape, their routes.

A task moves pending → processing → completed | failed | cancelled and never
leaves a final state. Every state change is a conditional UPDATE fenced by the
task's ``attempt`` number, so a worker that lost its lease (and whose job was
handed to another worker) can no longer write (see ``workers/lease.py``).
"""
