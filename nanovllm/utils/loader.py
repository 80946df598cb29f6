"""Load HF safetensors checkpoints (single file or sharded) into our fused, tensor-parallel modules.

Each parameter's weight loader reads its rank's part of a tensor through a safetensors slice,
so a rank reads only its own shard of every tensor from the file.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from torch import nn

from nanovllm.layers.linear import MergedColumnParallelLinear
from nanovllm.layers.weight_slice import Loaded, copy_slice


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a model directory, from its index json when sharded."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path!r} (use load_format='dummy' for random weights)")
    return files


def load_model(model: nn.Module, path: str) -> None:
    """Copy every checkpoint tensor into its parameter; error on missing or unknown names.

    A fused parameter (qkv_proj, gate_up_proj) is accounted for shard by shard, so a
    checkpoint lacking k_proj is an error rather than random values in its slice.
    """
    expected = expected_tensors(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and _is_tied(model)):
                    continue
                if name not in expected:
                    raise ValueError(f"checkpoint tensor {name!r} in {file!r} has no place in {type(model).__name__}")
                target, shard = expected[name]
                param = params[target]
                loader = getattr(param, "weight_loader", _copy_whole)
                loader(param, f.get_slice(name), shard)
                loaded.add(name)
    missing = sorted(expected.keys() - loaded)
    if missing:
        raise ValueError(f"checkpoint in {path!r} lacks {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def expected_tensors(model: nn.Module) -> dict[str, tuple[str, object]]:
    """HF tensor name -> (our parameter name, shard id) for every tensor the checkpoint must hold.

    A MergedColumnParallelLinear's parameters expand into one HF tensor per shard, named through the
    model's `packed_modules_mapping` (HF name -> (our fused name, shard id)).
    """
    hf_names = {fused: hf for hf, fused in getattr(model, "packed_modules_mapping", {}).items()}
    tied = _tied_names(model)
    expected: dict[str, tuple[str, object]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, _ in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if name in tied:
                continue
            if not isinstance(module, MergedColumnParallelLinear):
                expected[name] = (name, None)
                continue
            parent, _, fused = module_name.rpartition(".")
            for shard in module.shard_names or range(len(module.output_sizes)):
                assert (fused, shard) in hf_names, f"packed_modules_mapping lacks shard {shard!r} of {fused!r}"
                expected[f"{parent}.{hf_names[fused, shard]}.{param_name}"] = (name, shard)
    return expected


def load_dummy(model: nn.Module, seed: int) -> None:
    """Small random weights of the right shapes, as vLLM's load_format='dummy' (norms stay 1)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-1e-3, 1e-3, generator=generator)


def _copy_whole(param: nn.Parameter, loaded: Loaded, shard: object) -> None:
    """A parameter every rank holds whole (norms)."""
    copy_slice(param.data, loaded)


def _is_tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def _tied_names(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if _is_tied(model) else set()
