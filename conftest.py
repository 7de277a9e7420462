"""Whole-suite settings. `./imgest test` runs the suite on two pytest-xdist workers: each test
module runs whole on one worker (the stack, broker or database it starts is started once), and
the modules that share the end-to-end stack (`xdist_group("stack")`) stay together."""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
