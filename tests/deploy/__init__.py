"""The deployment files in deploy/ stay true to the code, checked without Docker or a cluster.

A package, so that its ``conftest.py`` and helper modules (``files.py``: finding and
reading the files; ``metrics_contract.py``: the metrics contract and PromQL) have module
names of their own.
"""
