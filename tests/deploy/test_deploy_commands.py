"""Every command the deployment files run is a real command of the ``tollgate`` CLI."""

import tomllib

import click
import pytest

from deploy.files import ROOT, WORKER_ARGUMENTS, tollgate_services, workloads
from gateway.cli import main as tollgate_cli


def commands() -> list[tuple[str, list[str]]]:
    found = [(f"compose {n}", s["command"]) for n, s in tollgate_services().items()]
    for name, spec in workloads():
        found += [(f"k8s {name}", container["args"]) for container in spec["containers"]]
    return found


@pytest.mark.parametrize(("where", "argv"), commands(), ids=[w for w, _ in commands()])
def test_every_command_is_a_real_tollgate_command(where: str, argv: list[str]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    program, *arguments = argv
    assert program in scripts
    if program == "tollgate-worker":
        assert tuple(arguments) in WORKER_ARGUMENTS
        return
    command: click.Command = tollgate_cli
    while isinstance(command, click.Group) and arguments and arguments[0] in command.commands:
        command = command.commands[arguments.pop(0)]
    if arguments != ["--help"]:
        # Parses the options (a wrong one raises a UsageError); runs nothing.
        command.make_context(program, arguments)
