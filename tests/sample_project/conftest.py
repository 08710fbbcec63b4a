import pytest
from shop.flows import registry


@pytest.fixture(scope="session")
def pgflow_flows():
    return registry
