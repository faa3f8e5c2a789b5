# The gateway fixtures live in tests/gateway_fixtures.py (a plugin of the root
# conftest) so that tests/security can use them too; Client is re-exported here
# for the tests that import it from this package.
from gateway_fixtures import Client

__all__ = ["Client"]
