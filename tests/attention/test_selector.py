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


def missing(module: str):
    def make():
        raise ImportError(f"No module named '{module}'")
    return make


def test_auto_on_cuda_prefers_triton_then_flash_attn(monkeypatch):
    """No GPU needed: the backends' constructors are stood in for by markers, the choice is real."""
    monkeypatch.setattr(selector, "_triton", lambda: "triton")
    monkeypatch.setattr(selector, "_flash_attn", lambda: "flash_attn")
    monkeypatch.setattr(selector, "_announce", lambda backend: backend)
    assert select_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    monkeypatch.setattr(selector, "_triton", missing("triton"))
    assert select_backend("auto", torch.device("cuda"), torch.float16) == "flash_attn"


def test_auto_on_cuda_without_fast_backends_warns(monkeypatch):
    """The fallback to the slow reference on a GPU is never silent (no GPU needed: the imports fail)."""
    monkeypatch.setattr(selector, "_flash_attn", missing("flash_attn"))
    monkeypatch.setattr(selector, "_triton", missing("triton"))
    with pytest.warns(RuntimeWarning, match="flash_attn.*torch reference.*pip install"):
        backend = select_backend("auto", torch.device("cuda"), torch.bfloat16)
    assert isinstance(backend, TorchRefBackend)
    with pytest.raises(ValueError, match="does not import"):
        select_backend("flash_attn", torch.device("cuda"), torch.bfloat16)
