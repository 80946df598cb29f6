"""The LM head's logits are float32 for any model dtype, with the half-precision products exact."""
from __future__ import annotations

import pytest
import torch

from nanovllm.layers.embed_head import ParallelLMHead, float32_logits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float32_logits_of_half_inputs(device, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(5, 96, device=device).to(dtype)
    weight = (torch.randn(300, 96, device=device) / 10).to(dtype)
    logits = float32_logits(hidden, weight)
    assert logits.dtype == torch.float32 and logits.shape == (5, 300)
    exact = hidden.double() @ weight.double().T  # what float32 accumulation approximates, no output rounding
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-5)
    if dtype != torch.float32:  # the model dtype's own output would be rounded far coarser
        rounded = (hidden @ weight.T).double()
        assert (rounded - exact).abs().max() > 10 * (logits.double() - exact).abs().max()


def test_lm_head_of_a_bf16_model_returns_float32():
    torch.manual_seed(0)
    head = ParallelLMHead(50, 16)
    torch.nn.init.normal_(head.weight)
    head = head.to(torch.bfloat16)
    hidden = torch.randn(3, 16).to(torch.bfloat16)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ head.weight.float().T)
