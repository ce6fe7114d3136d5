"""The style registry: every registered style is complete and tested forward and backward."""

from __future__ import annotations

import importlib
import inspect

import pytest

from torchtitan_upipe.titan import styles
from torchtitan_upipe.titan.groups import CPGroups
from torchtitan_upipe.titan.sharding import ContiguousSharder

# Per style, tests that run its forward and backward against a single-device reference
# (module, function).  A new style must add its own here.
FORWARD_BACKWARD_TESTS = {
    "none": [("tests.titan.test_trainer", "test_no_cp_style_matches_plain_torchtitan")],
    "ulysses": [("tests.cp.test_ulysses", "test_ulysses_matches_single_device"),
                ("tests.titan.test_trainer", "test_ulysses_matches_single_device")],
    "upipe": [("tests.cp.test_upipe", "test_upipe_matches_reference"),
              ("tests.integration.test_hybrids", "test_hybrids_match_single_device"),
              ("tests.titan.test_trainer", "test_upipe_matches_ulysses")],
    "ring": [("tests.titan.test_trainer", "test_torchtitan_ring_matches_single_device")],
    "usp": [("tests.integration.test_hybrids", "test_hybrids_match_single_device"),
            ("tests.titan.test_trainer", "test_hybrids_match_ulysses_and_single_device")],
}


def test_registration_order_is_the_documented_one():
    assert styles.style_names() == ("none", "ulysses", "upipe", "ring", "usp")
    with pytest.raises(ValueError, match=r"context_parallel.style='x' is not one of \['none', "):
        styles.get_style("x")


@pytest.mark.parametrize("name", styles.style_names())
def test_every_style_is_complete(name):
    style = styles.get_style(name)
    cls = type(style)
    assert not inspect.isabstract(cls), f"{name}: abstract methods left"
    for method in ("layout", "check", "sharder", "install"):
        assert callable(getattr(style, method)), (name, method)
    u, big_u = style.layout(8, 0, 0)
    assert 8 % u == 0 and (big_u == 0) == (not style.stages_heads)
    sharder = style.sharder(CPGroups.local())
    if style.uses_all_to_all:
        assert isinstance(sharder, ContiguousSharder)
        assert callable(style.strategy)
    else:
        assert sharder is None  # TorchTitan's own sharding (or none)
    assert cls.__doc__, f"{name}: say what the style does"


@pytest.mark.parametrize("name", styles.style_names())
def test_every_style_has_forward_and_backward_tests(name):
    tests = FORWARD_BACKWARD_TESTS.get(name)
    assert tests, f"style {name!r} has no forward+backward test listed in this file"
    for module, function in tests:
        assert callable(getattr(importlib.import_module(module), function, None)), (module, function)
