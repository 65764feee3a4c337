import pytest

from tests.kubeapi import kube_source as _kube_source


@pytest.fixture
def kube_source(tmp_path):
    """A cluster for one test: FakeKubeAPI, or the real one when $KUBECONFIG is set (see tests/kubeapi.py)."""
    with _kube_source(tmp_path) as source:
        yield source
