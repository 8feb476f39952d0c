"""Devices: what a run on a machine with or without CUDA meets."""
import pytest
import torch

from utils import RaftError


# --------------------------------------------------------------------------- devices and mixed precision
def test_cuda_device_index_is_checked_and_made_current(monkeypatch):
    from utils import resolve_device
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: current.append(i))
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [1]
    with pytest.raises(RaftError, match=r"device 'cuda:7' does not exist: this machine has 2 CUDA device\(s\)"):
        resolve_device("cuda:7")
    with pytest.raises(RaftError, match="is not a device name"):
        resolve_device("gpu0")
