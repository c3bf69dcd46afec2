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
