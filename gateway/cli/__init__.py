"""``tollgate``: the operator's command line.

Reads the same ``TOLLGATE_*`` environment as the gateway and talks to
PostgreSQL directly (no running gateway needed). Output is JSON, one document
per command, so it can be piped into ``jq``. Errors go to stderr with exit 1,
or exit 2 for click's usage errors, which name the option (a malformed value;
for ``channels``, any field the service refuses).

One module per command group, each calling the domain services (never the
admin routes); ``common.py`` has what they share. ``main`` is the entry point
(``tollgate = "gateway.cli:main"``; ``python -m gateway.cli`` runs it too).
"""

import click

from gateway.cli.channels import channels
from gateway.cli.codes import codes
from gateway.cli.credits import credits, usage
from gateway.cli.keys import keys
from gateway.cli.ledger import ledger_group
from gateway.cli.limits import limits
from gateway.cli.prices import groups, price_changes, rates, usage_export
from gateway.cli.secrets import secrets
from gateway.cli.server import migrate, serve
from gateway.cli.tasks import tasks
from gateway.cli.tenants import tenants
from gateway.cli.users import users


@click.group()
def main() -> None:
    """Tollgate: API gateway and billing proxy for image generation."""


for command in (
    migrate,
    serve,
    tenants,
    keys,
    tasks,
    credits,
    usage,
    limits,
    ledger_group,
    channels,
    secrets,
    codes,
    groups,
    rates,
    price_changes,
    usage_export,
    users,
):
    main.add_command(command)
