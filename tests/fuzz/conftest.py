"""pytest configuration of the fuzz tests."""


def pytest_configure(config):
    # tests/unit/test_differential.py (whose helpers the frames target reuses)
    # marks its tests with this; register it here too, where it is imported
    config.addinivalue_line("markers", "deflate: needs permessage-deflate (RFC 7692) support in the engine")
