"""The address counts kept with a render, brought up to date by renderers.incremental in time of
the changed pods: the same as Counter arithmetic over every address (`counts - gone + came`)."""
from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from weft.renderers.incremental import _moved

ADDRESSES = st.sampled_from([f"198.18.0.{i}" for i in range(6)] + ["2001:db8::1"])
COUNTS = st.dictionaries(ADDRESSES, st.integers(1, 3)).map(Counter)


@given(COUNTS, COUNTS, COUNTS)
def test_moved_counts_equal_counter_arithmetic(counts, gone, came):
    before = Counter(counts)
    moved = _moved(counts, gone, came)
    assert moved == counts - gone + came
    assert all(n > 0 for n in moved.values())      # an address no pod holds is not counted
    assert counts == before                         # the kept counts are not changed in place
