"""Stop strings (split across tokens), include_stop_str_in_output, stop_token_ids and min_tokens,
with a tiny byte-level BPE tokenizer trained offline and a random model over its vocabulary."""
from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY, TINY_MODELS
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanovllm import LLM, SamplingParams
from nanovllm.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for stop strings",
    "stop strings may be split across token boundaries",
    "pack my box with five dozen liquor jugs",
] * 4


def train_tokenizer(vocab_size: int = 160, all_bytes: bool = False) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE over CORPUS; with `all_bytes` every byte has a token, so any text encodes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if all_bytes else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                        initial_alphabet=alphabet))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Qwen3 over the tokenizer's vocabulary, with the tokenizer saved beside it."""
    path = str(tmp_path_factory.mktemp("stop_model"))
    tokenizer = train_tokenizer()
    config_cls, model_cls, overrides = TINY_MODELS["qwen3"]
    config = getattr(transformers, config_cls)(**{**TINY, **overrides, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).float().eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, device="cpu")


PROMPT = "the quick brown"
MAX = 24


@pytest.fixture(scope="module")
def greedy(llm):
    """The greedy continuation without stops: its tokens and each token's text."""
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True), use_tqdm=False)[0]
    tokens = out.outputs[0].token_ids
    texts = [llm.tokenizer.decode(tokens[:k], skip_special_tokens=True) for k in range(MAX + 1)]
    assert out.outputs[0].text == texts[-1] and len(texts[-1]) > 20
    return tokens, texts


def reference(texts: list[str], stops: list[str], min_tokens: int = 0, include: bool = False):
    """(tokens kept, stop string, text): the first token whose new text completes a stop string."""
    for k in range(max(min_tokens, 1), len(texts)):
        found = [(texts[k].find(s, max(0, len(texts[k - 1]) - len(s) + 1)), -len(s), s) for s in stops]
        found = [f for f in found if f[0] != -1]
        if found:
            i, _, s = min(found)
            return k, s, texts[k][: i + (len(s) if include else 0)]
    return None


def boundary_stop(texts: list[str]) -> tuple[str, int]:
    """A 4-character stop string whose first occurrence straddles a token boundary, and that token."""
    for k in range(2, len(texts)):
        prev, cur = texts[k - 1], texts[k]
        if len(cur) - len(prev) >= 2 and len(prev) >= 2 and len(texts[k - 1]) > len(texts[k - 2]):
            stop = cur[len(prev) - 2 : len(prev) + 2]
            if cur.find(stop) == len(prev) - 2:
                return stop, k
    raise AssertionError("no token boundary to split a stop string over")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(llm, greedy, include):
    tokens, texts = greedy
    stop, k = boundary_stop(texts)
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert (len(out.token_ids), out.stop_reason, out.text) == reference(texts, [stop], include=include)
    assert out.token_ids == tokens[:k] and out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (texts[k][: texts[k].find(stop) + len(stop)] if include else texts[k][: texts[k].find(stop)])


def test_earliest_of_several_stop_strings_wins(llm, greedy):
    tokens, texts = greedy
    late, early = texts[-1][-3:], texts[6][-2:]
    stops = [late, early, "never appears in it: \x00"]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, stop=stops),
                       use_tqdm=False)[0].outputs[0]
    k, stop, text = reference(texts, stops)
    assert (out.token_ids, out.stop_reason, out.text) == (tokens[:k], stop, text)
    assert k <= 6


def test_stop_string_waits_for_min_tokens(llm, greedy):
    tokens, texts = greedy
    stop = texts[2][-1]  # a character the first two or three tokens already produce
    first = reference(texts, [stop])
    assert first is not None and first[0] <= 3
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, stop=[stop], min_tokens=8)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    expected = reference(texts, [stop], min_tokens=8)
    if expected is None:
        assert out.token_ids == tokens and out.finish_reason == "length"
    else:
        assert (len(out.token_ids), out.stop_reason, out.text) == expected and len(out.token_ids) >= 8
        assert out.token_ids == tokens[: expected[0]]


def test_stop_token_ids(llm, greedy):
    tokens, texts = greedy
    j = next(i for i in range(3, MAX) if tokens[i] not in tokens[:i] and len(texts[i + 1]) > len(texts[i]))
    stop_id = tokens[j]
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, stop_token_ids=[stop_id],
                                include_stop_str_in_output=include)
        out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == tokens[: j + 1]  # the stop token stays in token_ids (vLLM)
        assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
        assert out.text == texts[j + 1 if include else j]  # ... but not in the text, unless asked for
    # Before min_tokens the sampler never picks a stop token.
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, stop_token_ids=[stop_id],
                            min_tokens=j + 3)
    out = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert stop_id not in out.token_ids[: j + 3] and len(out.token_ids) > j + 3
    assert out.token_ids[:j] == tokens[:j]
    assert out.finish_reason == "length" or (out.stop_reason == stop_id and out.token_ids[-1] == stop_id)


def test_eos_text_and_reason(llm, greedy):
    tokens, texts = greedy
    j = next(i for i in range(2, MAX) if tokens[i] not in tokens[:i])
    saved = llm.config.eos_token_ids
    llm.config.eos_token_ids = [tokens[j]]
    try:
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX), use_tqdm=False)[0].outputs[0]
    finally:
        llm.config.eos_token_ids = saved
    assert out.token_ids == tokens[: j + 1] and (out.finish_reason, out.stop_reason) == ("stop", None)
    assert out.text == texts[j]


def test_n_branches_stop_independently(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=MAX, ignore_eos=True, stop=["o", "e"])
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    for c in out.outputs:
        full = [llm.tokenizer.decode(c.token_ids[:k], skip_special_tokens=True) for k in range(len(c.token_ids) + 1)]
        expected = reference(full, ["o", "e"])
        if c.finish_reason == "stop":
            assert (len(c.token_ids), c.stop_reason, c.text) == expected
        else:
            assert expected is None and len(c.token_ids) == MAX


def test_stop_strings_need_a_tokenizer(model_dir):
    llm = LLM(model_dir, device="cpu", skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        llm.generate([[1, 2, 3]], SamplingParams(stop=["ab"]), use_tqdm=False)
    assert not llm.requests and not llm.scheduler.waiting  # nothing was queued
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, stop_token_ids=[5]), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) <= 3


def test_incremental_detokenizer_unit(llm):
    tokenizer = llm.tokenizer
    text = "hello world, this is split"
    ids = tokenizer.encode(text)
    assert len(ids) > 4
    detok = IncrementalDetokenizer(tokenizer, ["lo wor", "is is"], include_stop_str_in_output=False)
    k = next(i for i, t in enumerate(ids) if detok.add_and_check(t, may_stop=True))
    assert detok.text == "hel"
    assert tokenizer.decode(ids[: k + 1]).find("lo wor") == 3 and "lo wor" not in tokenizer.decode(ids[:k])
    # Blocked while may_stop is False, a match is not found later once it is no longer in new text.
    detok = IncrementalDetokenizer(tokenizer, ["lo wor"], include_stop_str_in_output=True)
    assert [detok.add_and_check(t, may_stop=i > k) for i, t in enumerate(ids)] == [None] * len(ids)
    assert detok.text == tokenizer.decode(ids)


@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_joins_to_final_text(llm, greedy, include):
    """Deltas from step(): text that may start a stop string is held back, so the stream never
    shows characters past the cut, and the joined deltas equal generate's text."""
    tokens, texts = greedy
    stop = texts[-1][len(texts[MAX // 2]) :][:4]  # a string that first completes mid-way
    params = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    final = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    llm.add_request("s", PROMPT, params)
    streamed, ids = "", []
    while llm.has_unfinished_requests():
        for out in llm.step():
            streamed += out.outputs[0].text
            ids += out.outputs[0].token_ids
            assert final.text.startswith(streamed)
    assert streamed == final.text and ids == final.token_ids and final.stop_reason == stop
    plain = SamplingParams(temperature=0, max_tokens=MAX, ignore_eos=True)  # no stop strings: every token's text
    llm.add_request("p", PROMPT, plain)
    pieces = []
    while llm.has_unfinished_requests():
        pieces += [out.outputs[0].text for out in llm.step()]
    assert "".join(pieces) == texts[-1]


@pytest.mark.parametrize("text", ["hello world, this is split", "naïve café: 日本語 🙂 jumps over 🙃!"])
def test_decode_stream_and_window_give_the_full_decode(text):
    """The fast path (a Rust DecodeStream) and the window path give the same pieces' text as one
    decode of every token, special tokens skipped, multi-byte characters split across byte tokens."""
    tokenizer = train_tokenizer(400, all_bytes=True)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    ids = ids[:3] + [tokenizer.eos_token_id] + ids[3:]  # a special token mid-way: skipped
    assert len(ids) > len(text.split()) + 1
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    fast = IncrementalDetokenizer(tokenizer, [], False)
    window = IncrementalDetokenizer(tokenizer, [], False)
    assert fast.stream is not None
    window.stream = None
    for detok in (fast, window):
        pieces = [detok.add(t) for t in ids]
        assert "".join(pieces) == detok.text == expected
        assert all("\ufffd" not in p for p in pieces)  # a split character comes out whole
