"""Layouts as permutations and reshapes planned across them (bnkit.convert.layouts), checked on
NumPy arrays: the planned permute and reshape of the target give the source's reshape, exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnkit.convert.layouts import ReshapeError, inverse, mapped_layout, plan_reshape


def _apply(src_in, src_out, order, preferred):
    """Carry the plan out on arrays; return (source reshaped, target after the plan, the plan)."""
    source = np.arange(2 * int(np.prod(src_in[1:]))).reshape(2, *src_in[1:])
    target = source.transpose(order)
    plan = plan_reshape((None, *src_in[1:]), (None, *src_out[1:]), order, preferred)
    if plan.permute is not None:
        assert plan.permute[0] == 0
        target = target.transpose(plan.permute)
    target = target.reshape(2, *plan.shape)
    return source.reshape(2, *src_out[1:]), target, plan


@st.composite
def _reshapes(draw):
    """A shape, a reshape of it (merges, splits, size-1 dims in and out) and a layout."""
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=4))
    out = list(sizes)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["merge", "split", "insert", "drop"]))
        if kind == "merge" and len(out) > 1:
            i = draw(st.integers(0, len(out) - 2))
            out[i : i + 2] = [out[i] * out[i + 1]]
        elif kind == "split":
            i = draw(st.integers(0, len(out) - 1))
            factors = [f for f in (2, 3) if out[i] % f == 0 and out[i] > f]
            if factors:
                f = draw(st.sampled_from(factors))
                out[i : i + 1] = [f, out[i] // f]
        elif kind == "insert":
            out.insert(draw(st.integers(0, len(out))), 1)
        elif kind == "drop" and 1 in out and len(out) > 1:
            out.remove(1)
    order = (0, *draw(st.permutations(range(1, len(sizes) + 1))))
    return (None, *sizes), (None, *out), order


@settings(max_examples=300, deadline=None)
@given(_reshapes(), st.booleans())
def test_a_planned_reshape_gives_the_source_reshape_in_the_layout_it_reports(case, prefer_mapped):
    src_in, src_out, order = case
    preferred = mapped_layout(len(src_out)) if prefer_mapped else tuple(range(len(src_out)))
    expected, got, plan = _apply(src_in, src_out, order, preferred)
    assert sorted(plan.order) == list(range(len(src_out))) and plan.order[0] == 0
    np.testing.assert_array_equal(got, expected.transpose(plan.order))


def test_channel_shuffle_in_nhwc_is_reshape_permute_reshape():
    # torch (N, C=6, H=2, W=5) -> (N, 2, 3, H, W): Keras sees channels last
    nchw, keras_of_torch = (None, 6, 2, 5), mapped_layout(4)
    split = plan_reshape(nchw, (None, 2, 3, 2, 5), keras_of_torch, mapped_layout(5))
    assert split.permute is None and split.shape == (2, 5, 2, 3) and split.order == (0, 3, 4, 1, 2)
    swapped = tuple({1: 2, 2: 1}.get(d, d) for d in split.order)  # transpose(1, 2) renames the dims
    merged = plan_reshape((None, 3, 2, 2, 5), (None, 6, 2, 5), swapped, mapped_layout(4))
    assert merged.permute == (0, 1, 2, 4, 3) and merged.shape == (2, 5, 6) and merged.order == mapped_layout(4)


def test_a_flatten_of_a_mapped_tensor_permutes_to_the_source_order_first():
    plan = plan_reshape((None, 3, 4, 5), (None, 60), mapped_layout(4), mapped_layout(2))
    assert plan.permute == inverse(mapped_layout(4)) and plan.shape == (60,)


def test_size_one_axes_need_no_permute():
    # (N, C, 1, 1) -> (N, C) in NHWC, and back: no data move
    assert plan_reshape((None, 5, 1, 1), (None, 5), mapped_layout(4), mapped_layout(2)).permute is None
    back = plan_reshape((None, 5), (None, 5, 1, 1), mapped_layout(2), mapped_layout(4))
    assert back.permute is None and back.order == mapped_layout(4) and back.shape == (1, 1, 5)


@pytest.mark.parametrize(("src_in", "src_out"), [((None, 4, 3), (None, 6)), ((None, 0, 3), (None, 3, 0))])
def test_reshapes_across_the_batch_are_refused(src_in, src_out):
    with pytest.raises(ReshapeError):
        plan_reshape(src_in, src_out, tuple(range(len(src_in))), tuple(range(len(src_out))))


def test_every_permutation_of_a_small_tensor_flattens_correctly():
    for perm in itertools.permutations(range(1, 4)):
        expected, got, plan = _apply((None, 2, 3, 4), (None, 24), (0, *perm), (0, 1))
        np.testing.assert_array_equal(got, expected.transpose(plan.order))
