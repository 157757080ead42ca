"""``python -m gateway.cli``: the same as ``tollgate``."""

from gateway.cli import main

main()
