"""BeamSearchParams: type and range checks, at construction and again by validate()."""
from __future__ import annotations

import math

import pytest

from nanovllm import BeamSearchParams


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_length_penalty_is_rejected(value):
    with pytest.raises(ValueError, match=rf"^length_penalty must be finite, got {value}"):
        BeamSearchParams(2, 4, length_penalty=value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(ignore_eos="no"), "ignore_eos"),
    (dict(ignore_eos=0), "ignore_eos"),
    (dict(length_penalty="1"), "length_penalty"),
    (dict(early_stopping=1), "early_stopping"),
])
def test_wrong_types_name_the_field(kwargs, field):
    with pytest.raises(TypeError, match=rf"^{field}\b"):
        BeamSearchParams(2, 4, **kwargs)


def test_early_stopping_string_other_than_never_is_rejected():
    with pytest.raises(ValueError, match="^early_stopping must be True, False or 'never'"):
        BeamSearchParams(2, 4, early_stopping="yes")


@pytest.mark.parametrize("field, value, error", [
    ("beam_width", 0, ValueError),
    ("max_tokens", 2.0, TypeError),
    ("length_penalty", math.nan, ValueError),
    ("ignore_eos", "no", TypeError),
    ("early_stopping", "always", ValueError),
])
def test_validate_catches_changes_after_construction(field, value, error):
    params = BeamSearchParams(2, 4, early_stopping="never")
    params.validate()
    setattr(params, field, value)
    with pytest.raises(error, match=rf"^{field}\b"):
        params.validate()
