"""Shared fixtures: tiny random HF models saved to disk, and HF's greedy continuation; scripts as modules."""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's interpreter; @triton.jit (triton.language's own helpers included)
    # reads this when it decorates, so it must be set before anything imports triton.language.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import transformers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (e.g. "scripts/step_time.py") imported as a module, its main() not run."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(relative_path))[0],
                                                  os.path.join(ROOT, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = dict(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.08)

# name -> (config class, model class, overrides); together: GQA and MHA, head dims 64 and 128,
# q/k norm, qkv bias, llama3 rope scaling.
TINY_MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=2, num_key_value_heads=1,
              rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=128))),
    "llama-hd128": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=256, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True)),
}


def build_tiny_model(name: str, path: str, seed: int = 0) -> transformers.PreTrainedModel:
    config_cls, model_cls, overrides = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """name -> (directory, HF model) for a tiny random model, built once per session."""
    cache: dict[str, tuple[str, transformers.PreTrainedModel]] = {}

    def get(name: str) -> tuple[str, transformers.PreTrainedModel]:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name))
            cache[name] = (path, build_tiny_model(name, path))
        return cache[name]

    return get


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
WORDS = ("the a river town baker bird bridge market apple box child list quiet every past where of and to "
         "in is was it you hello world what how why name tell me story user assistant system").split()


def build_tiny_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' 384 ids, with a chat template; built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = WORDS + [f"w{i}" for i in range(TINY["vocab_size"] - len(specials) - len(WORDS))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                                     eos_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
    """A tiny random qwen3 model with a tiny word-level tokenizer and chat template: its directory."""
    path = str(tmp_path_factory.mktemp("qwen3-chat"))
    build_tiny_model("qwen3", path)
    build_tiny_tokenizer(path)
    return path


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = TINY["vocab_size"]) -> list[list[int]]:
    """Random token-id prompts of the given lengths, reproducible from the seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in lengths]


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF transformers' greedy continuation, EOS ignored (min_new_tokens = max_new_tokens)."""
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()
