"""The README stays true: its quickstart and configuration table match the code."""

import re
from pathlib import Path

from gateway.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_quickstart_is_one_block_of_exactly_two_commands() -> None:
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line for line in block[1].splitlines() if line.strip()]
    assert commands == ["python3 scripts/dev.py run", "python3 scripts/dev.py test"]


def test_configuration_table_lists_every_setting() -> None:
    documented = set(re.findall(r"^\| `(TOLLGATE_[A-Z_]+)` \|", README, re.M))
    expected = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    assert documented == expected
