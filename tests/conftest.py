import pytest

from fakedata import INTEGRITY_TARGETS, _exists_only


@pytest.fixture
def patched_integrity(monkeypatch):
    """Patch torchvision's md5 check to a plain file-exists check for one test."""
    for target in INTEGRITY_TARGETS:
        monkeypatch.setattr(target, _exists_only)
