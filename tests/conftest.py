import pytest

from fakedata import INTEGRITY_TARGETS, _exists_only, make_fake_dataset


@pytest.fixture
def patched_integrity(monkeypatch):
    """Patch torchvision's md5 check to a plain file-exists check for one test."""
    for target in INTEGRITY_TARGETS:
        monkeypatch.setattr(target, _exists_only)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Fake Fashion-MNIST for the script runs (its loader checks no md5, so a subprocess reads it too)."""
    root = tmp_path_factory.mktemp("data")
    make_fake_dataset("fashion_mnist", root, n_train=200, n_test=40)
    return str(root)
