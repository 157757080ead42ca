"""The metrics contract is what the code exports."""

from deploy.metrics_contract import CONTRACT, families_in_code, family_name


def test_metrics_contract_is_what_the_code_exports() -> None:
    contract = {family_name(n, f): f.type for n, f in CONTRACT.items()}
    assert families_in_code() == contract
