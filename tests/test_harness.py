"""The method harness itself can fail: a method whose state is not restored, or that differs
from its base, is caught."""
import pytest

from utils import assert_same_step, state_round_trip_reproduces_next_step


def test_harness_passes_for_known_cases():
    state_round_trip_reproduces_next_step("ogm_ge", ["method.alpha=0.5"])
    assert_same_step("ogm", ["method.alpha=0"], base="joint")
    assert_same_step("multiloss", ["method.unimodal_weight=0"], base="multiloss",
                     base_overrides=["method.unimodal_weight=0"])


def test_harness_catches_a_different_step():
    with pytest.raises(AssertionError, match="no-op differs"):
        assert_same_step("ogm", ["method.alpha=5"], base="joint")
