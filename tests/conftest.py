import os

import pytest
import torch

# Never reach for a hub: every pretrained lookup in the tests is against temporary caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tmp_torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME (and HF cache) so pretrained lookups never see the user's caches."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return home


@pytest.fixture
def one_thread():
    """One torch thread for the test: on a busy 2-core machine two threads per op wait on each other
    (a tiny op can take ~0.1 s), which slows timing-sensitive tests by 3-10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
