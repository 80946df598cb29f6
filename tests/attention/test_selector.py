"""Backend choice: the torch reference on CPU, errors for a backend that cannot run, a loud fallback."""
import pytest
import torch

import nanovllm.attention.selector as selector
from nanovllm.attention.backends.torch_ref import TorchRefBackend
from nanovllm.attention.selector import select_backend


def test_auto_on_cpu_is_torch_reference():
    assert isinstance(select_backend("auto", torch.device("cpu"), torch.float32), TorchRefBackend)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cuda", torch.float32)])
def test_flash_attn_needs_cuda_and_half(device, dtype):
    with pytest.raises(ValueError, match="flash_attn"):
        select_backend("flash_attn", torch.device(device), dtype)


def test_unknown_backend_and_kv_dtype_are_errors():
    with pytest.raises(ValueError, match="attention_backend"):
        select_backend("flash", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="kv_cache_dtype='int4'"):
        select_backend("torch", torch.device("cpu"), torch.float32, "int4")


def test_auto_on_cuda_without_flash_attn_warns(monkeypatch):
    """The fallback to the slow reference on a GPU is never silent (no GPU needed: the import fails)."""
    def missing():
        raise ImportError("No module named 'flash_attn'")

    monkeypatch.setattr(selector, "_flash_attn", missing)
    with pytest.warns(RuntimeWarning, match="torch reference.*pip install"):
        backend = select_backend("auto", torch.device("cuda"), torch.bfloat16)
    assert isinstance(backend, TorchRefBackend)
    with pytest.raises(ValueError, match="does not import"):
        select_backend("flash_attn", torch.device("cuda"), torch.bfloat16)
