"""Sharded loading: a rank's parameters are exactly its slice of the full checkpoint.

A rank's model is built and loaded in this process (building and loading run no collective),
for every rank of groups of 2 and 4: query heads split, KV heads split or replicated, vocabulary
rows padded, row-parallel columns split, norms and row-parallel biases whole.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from nanovllm.config import load_hf_config
from nanovllm.distributed.parallel_state import TensorParallel
from nanovllm.models import model_class
from nanovllm.utils.loader import load_model


def expected_slice(name: str, full: torch.Tensor, config, tp: TensorParallel) -> torch.Tensor:
    """This rank's part of HF tensor `name`, worked out from the heads and sizes alone."""
    r, n = tp.rank, tp.size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if "q_proj" in name:
        per = config.num_attention_heads // n * head_dim
        return full[r * per : (r + 1) * per]
    if "k_proj" in name or "v_proj" in name:
        kv = config.num_key_value_heads
        heads = max(1, kv // n)
        first = r * kv // n if kv >= n else r // (n // kv)
        return full[first * head_dim : (first + heads) * head_dim]
    if "gate_proj" in name or "up_proj" in name:
        per = config.intermediate_size // n
        return full[r * per : (r + 1) * per]
    if ("o_proj" in name or "down_proj" in name) and name.endswith("weight"):
        per = full.shape[1] // n
        return full[:, r * per : (r + 1) * per]
    if "embed_tokens" in name or "lm_head" in name:
        per = -(-config.vocab_size // n)
        rows = full[r * per : (r + 1) * per]
        return torch.cat([rows, rows.new_zeros(per - len(rows), rows.shape[1])])
    return full  # norms, o_proj/down_proj bias


def our_tensor(model: torch.nn.Module, hf_name: str) -> torch.Tensor:
    """Our part of `hf_name`: a parameter, or the slice of a fused one."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for hf, (fused, shard) in model.packed_modules_mapping.items():
        if f".{hf}." in hf_name:
            prefix, _, param = hf_name.partition(f".{hf}.")
            module = model.get_submodule(f"{prefix}.{fused}")
            index = module.shard_names.index(shard) if shard in module.shard_names else shard
            start = sum(module.local_sizes[:index])
            return params[f"{prefix}.{fused}.{param}"][start : start + module.local_sizes[index]]
    return params[hf_name]


@pytest.mark.parametrize("name", ["qwen3", "qwen2", "llama-hd128"])
@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_holds_its_slice_of_the_checkpoint(tiny_model, name, size):
    path, _ = tiny_model(name)
    config = load_hf_config(path)
    if config.num_attention_heads % size:
        pytest.skip(f"{config.num_attention_heads} heads do not split over {size} ranks")
    full = load_file(f"{path}/model.safetensors")
    if config.tie_word_embeddings:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    for rank in range(size):
        tp = TensorParallel(rank, size)
        model = model_class(config)(config, tp)
        load_model(model, path)
        for hf_name, tensor in full.items():
            ours, expected = our_tensor(model, hf_name), expected_slice(hf_name, tensor, config, tp)
            assert torch.equal(ours, expected), f"rank {rank}/{size}: {hf_name}"
