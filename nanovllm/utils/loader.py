"""Load HF safetensors checkpoints (single file or sharded) into our fused modules."""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from torch import nn


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
    """Copy every checkpoint tensor into its parameter; error on missing or unknown names."""
    params = dict(model.named_parameters(remove_duplicate=False))
    mapping = getattr(model, "packed_modules_mapping", {})
    loaded: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(file, "pt", "cpu") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name:
                    continue
                target, shard = _target(name, mapping)
                if target not in params:
                    if name == "lm_head.weight" and _is_tied(model):
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} in {file!r} has no place in {type(model).__name__}")
                param = params[target]
                loader = getattr(param, "weight_loader", _copy_whole)
                loader(param, f.get_tensor(name), shard)
                loaded.add(target)
    missing = {n for n in params if n not in loaded} - _tied_names(model)
    if missing:
        raise ValueError(f"checkpoint in {path!r} lacks {sorted(missing)[:8]}{' ...' if len(missing) > 8 else ''}")


def load_dummy(model: nn.Module, seed: int) -> None:
    """Small random weights of the right shapes, as vLLM's load_format='dummy' (norms stay 1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-1e-3, 1e-3)


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, shard: object) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)


def _target(name: str, mapping: dict) -> tuple[str, object]:
    for hf_name, (ours, shard) in mapping.items():
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{ours}."), shard
    return name, None


def _is_tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def _tied_names(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if _is_tied(model) else set()
