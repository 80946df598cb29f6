"""Model resolution: local dirs, GGUF conversion (on tiny GGUFs written here), clear errors, offline hub ids.

The real default model is exercised in tests/test_default_model.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

# the optional GGUF support (gguf + accelerate) is in the test extras; the GPU image lacks it
gguf = pytest.importorskip("gguf")

from nanovllm.utils import model_source
from nanovllm.utils.model_source import convert_gguf, resolve_model

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 64, 2
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", *"abcdefghijklmnopqrstuvwxyz", "hi", "Ġh"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("NANOVLLM_CACHE", str(path))
    return path


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """How llama.cpp's convert_hf_to_gguf.py reorders Llama q/k rows (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True) -> dict[str, np.ndarray]:
    """A tiny F32 GGUF laid out as llama.cpp writes one; returns its weights under transformers' names."""
    rng = np.random.default_rng(0)
    hf: dict[str, np.ndarray] = {}
    stored: dict[str, np.ndarray] = {}

    def add(hf_name: str, gguf_name: str, *shape: int, permute_heads: int | None = None) -> None:
        w = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = w
        stored[gguf_name] = llama_cpp_permute(w, permute_heads) if permute_heads and arch == "llama" else w

    add("model.embed_tokens.weight", "token_embd.weight", len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(p + "input_layernorm.weight", b + "attn_norm.weight", HIDDEN)
        add(p + "self_attn.q_proj.weight", b + "attn_q.weight", HEADS * HEAD_DIM, HIDDEN, permute_heads=HEADS)
        add(p + "self_attn.k_proj.weight", b + "attn_k.weight", KV_HEADS * HEAD_DIM, HIDDEN, permute_heads=KV_HEADS)
        add(p + "self_attn.v_proj.weight", b + "attn_v.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(p + "self_attn.o_proj.weight", b + "attn_output.weight", HIDDEN, HEADS * HEAD_DIM)
        if arch == "qwen2":
            add(p + "self_attn.q_proj.bias", b + "attn_q.bias", HEADS * HEAD_DIM)
            add(p + "self_attn.k_proj.bias", b + "attn_k.bias", KV_HEADS * HEAD_DIM)
            add(p + "self_attn.v_proj.bias", b + "attn_v.bias", KV_HEADS * HEAD_DIM)
        if arch == "qwen3":
            add(p + "self_attn.q_norm.weight", b + "attn_q_norm.weight", HEAD_DIM)
            add(p + "self_attn.k_norm.weight", b + "attn_k_norm.weight", HEAD_DIM)
        add(p + "post_attention_layernorm.weight", b + "ffn_norm.weight", HIDDEN)
        add(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", FFN, HIDDEN)
        add(p + "mlp.up_proj.weight", b + "ffn_up.weight", FFN, HIDDEN)
        add(p + "mlp.down_proj.weight", b + "ffn_down.weight", HIDDEN, FFN)
    add("model.norm.weight", "output_norm.weight", HIDDEN)
    if not tied:
        add("lm_head.weight", "output.weight", len(TOKENS), HIDDEN)

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # transformers builds the tokenizer from these; a byte-level BPE needs tokens, types and merges.
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    w.add_token_merges(["h i", "Ġ h"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in stored.items():
        w.add_tensor(name, tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize(
    ("arch", "tied", "architecture"),
    [("llama", True, "LlamaForCausalLM"), ("qwen2", False, "Qwen2ForCausalLM"), ("qwen3", True, "Qwen3ForCausalLM")],
)
def test_gguf_round_trips_to_the_same_weights(tmp_path: Path, arch: str, tied: bool, architecture: str) -> None:
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")

    weights = load_file(out / "model.safetensors")
    if tied:  # a tied lm_head is either left out or saved as the embedding itself
        lm_head = weights.pop("lm_head.weight", weights["model.embed_tokens.weight"])
        assert torch.equal(lm_head, weights["model.embed_tokens.weight"])
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32, name
        assert torch.equal(weights[name], torch.from_numpy(tensor)), name

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert config["tie_word_embeddings"] is tied
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        HIDDEN, HEADS, KV_HEADS,
    )
    assert config.get("head_dim", HIDDEN // HEADS) == HEAD_DIM
    assert (config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]) == (
        LAYERS, FFN, len(TOKENS),
    )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"
    assert tokenizer.convert_ids_to_tokens(tokenizer("hi").input_ids) == ["hi"]


def test_large_models_are_stored_in_bfloat16(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(model_source, "_FLOAT32_MAX_PARAMS", 0)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    weights = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(weights[name], torch.from_numpy(expected[name]).to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_gguf_path_is_converted_once_into_the_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    first = Path(resolve_model(str(tmp_path / "tiny.gguf")))
    assert first.is_relative_to(cache) and (first / "config.json").is_file()
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary directory left behind

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(model_source, "convert_gguf", no_conversion)
    assert resolve_model(str(tmp_path / "tiny.gguf")) == str(first)


def test_interrupted_conversion_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")

    def interrupted(gguf_path: Path, out_dir: Path, *args: object) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_source, "_dequantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out" / "converted")
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(missing, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        resolve_model(str(tmp_path / "no_such_model"))


def test_corrupt_gguf_is_a_clear_error(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"corrupt\.gguf is not a readable GGUF file"):
        resolve_model(str(bad))
    assert not cache.exists()  # nothing converted or created


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"gpt2\.gguf.*'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        resolve_model(str(path))
    assert not cache.exists()


def test_other_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(path))


def test_local_dir_is_returned_as_is(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(model_dir))
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(str(model_dir)) == str(model_dir)
    assert resolve_model(model_dir) == str(model_dir)


def test_offline_hub_id_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # so that "nanovllm-test/not-a-model" is no local path either
    expected = r"'nanovllm-test/not-a-model'.*offline.*local model directory or \.gguf"
    with pytest.raises(FileNotFoundError, match=expected):
        resolve_model("nanovllm-test/not-a-model")


class FsPath:
    """A user-defined os.PathLike, not a pathlib.Path."""

    def __init__(self, path: object) -> None:
        self.path = path

    def __fspath__(self) -> object:
        return self.path


def test_path_like_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(FsPath(str(tmp_path))) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not_there"):
        resolve_model(FsPath(str(tmp_path / "not_there")))


@pytest.mark.parametrize("model", [5, b"/tmp", ["/tmp"], FsPath(b"/tmp")])
def test_other_types_are_a_type_error_naming_the_type(model: object) -> None:
    with pytest.raises(TypeError, match=rf"model must be a str, os\.PathLike or None, got {type(model).__name__}"):
        resolve_model(model)
