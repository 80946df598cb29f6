"""Checkpoint loading: sharded safetensors with an index, clear errors for bad directories."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from conftest import build_tiny_model, hf_greedy

from nanovllm import LLM, SamplingParams


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    hf_model = build_tiny_model("qwen2", str(tmp_path / "single"))
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    llm = LLM(str(tmp_path / "sharded"), skip_tokenizer_init=True, device="cpu")
    prompt = torch.randint(0, 384, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, prompt, 16)


def test_missing_weights_and_architecture_errors(tmp_path):
    build_tiny_model("llama", str(tmp_path / "m"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(tmp_path / "m" / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(empty), skip_tokenizer_init=True, device="cpu")
    config = json.loads((empty / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(empty), skip_tokenizer_init=True, device="cpu")


def test_dummy_weights_need_no_files():
    llm = LLM("preset:qwen3-0.6b", load_format="dummy", device="cpu", max_model_len=64, num_kvcache_blocks=8,
              dtype="bfloat16", max_num_seqs=2)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize("shard", ["self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                                   "mlp.gate_proj.weight", "mlp.up_proj.weight"])
def test_missing_part_of_a_fused_layer_is_an_error(tmp_path, shard):
    """Each HF tensor of a fused qkv/gate_up projection must be in the checkpoint, not only one of them."""
    build_tiny_model("qwen2", str(tmp_path))
    weights = load_file(tmp_path / "model.safetensors")
    name = f"model.layers.1.{shard}"
    del weights[name]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(repr(name))):
        LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu")


def test_unknown_tensor_is_an_error(tmp_path):
    build_tiny_model("qwen3", str(tmp_path))
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.self_attn.x_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="x_proj.*has no place"):
        LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu")


def test_tied_embeddings_load_with_or_without_lm_head(tmp_path):
    """A tied model's checkpoint may hold lm_head.weight or not; an untied one must hold it."""
    hf_model = build_tiny_model("llama-hd128", str(tmp_path / "tied"))
    weights = load_file(tmp_path / "tied" / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "tied" / "model.safetensors", metadata={"format": "pt"})
    llm = LLM(str(tmp_path / "tied"), skip_tokenizer_init=True, device="cpu")
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf_model, [1, 2, 3], 4)

    build_tiny_model("llama", str(tmp_path / "untied"))
    weights = load_file(tmp_path / "untied" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "untied" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        LLM(str(tmp_path / "untied"), skip_tokenizer_init=True, device="cpu")
