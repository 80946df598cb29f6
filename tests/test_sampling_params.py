"""SamplingParams: every field is type- and range-checked, at construction and again by validate()."""
from __future__ import annotations

import math

import pytest

from nanovllm import SamplingParams

FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_rejected(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be finite, got {value}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs, field", [
    (dict(ignore_eos="no"), "ignore_eos"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output"),
    (dict(stop=["ok", 3]), "stop"),
    (dict(stop=("a", "b")), "stop"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=[1, "2"]), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(stop_token_ids=(1, 2)), "stop_token_ids"),
    (dict(logprobs=1.0), "logprobs"),
    (dict(logprobs=True), "logprobs"),
    (dict(temperature="0"), "temperature"),
])
def test_wrong_types_name_the_field(kwargs, field):
    with pytest.raises(TypeError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(stop=""), "stop"),
    (dict(stop=["a", ""]), "stop"),
    (dict(stop_token_ids=[0, -1]), "stop_token_ids"),
    (dict(logprobs=-1), "logprobs"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_construction_normalizes_a_bare_stop_string_and_none():
    sp = SamplingParams(stop="x", stop_token_ids=None, logprobs=0)
    assert (sp.stop, sp.stop_token_ids) == (["x"], [])
    assert SamplingParams(stop=None).stop == []


@pytest.mark.parametrize("field, value, error", [
    ("max_tokens", 0, ValueError),
    ("temperature", math.nan, ValueError),
    ("top_p", math.inf, ValueError),
    ("ignore_eos", "no", TypeError),
    ("stop", "x", TypeError),  # only construction turns a bare str into a list
    ("stop", [""], ValueError),
    ("stop_token_ids", [-3], ValueError),
    ("logprobs", -1, ValueError),
])
def test_validate_catches_changes_after_construction(field, value, error):
    sp = SamplingParams()
    sp.validate()
    setattr(sp, field, value)
    with pytest.raises(error, match=rf"^{field}\b"):
        sp.validate()
    assert getattr(sp, field) is value  # nothing normalized silently


def test_good_params_pass_validate_unchanged():
    sp = SamplingParams(n=2, temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, seed=3, presence_penalty=-1,
                        frequency_penalty=2, repetition_penalty=1.1, max_tokens=8, min_tokens=2, ignore_eos=True,
                        stop=["a", "bc"], stop_token_ids=[0, 5], include_stop_str_in_output=True, logprobs=3)
    before = repr(sp)
    sp.validate()
    assert repr(sp) == before


def test_no_greedy_property():
    assert not hasattr(SamplingParams(), "greedy")
