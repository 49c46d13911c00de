"""The fault corpus's shared fixture: a previous bundle that every case must leave untouched."""
from __future__ import annotations

import pytest

from tests.helpers.bundles import copy_bundle
from tests.helpers.faults import leftovers, snapshot


@pytest.fixture
def old(tiny_bundle, tmp_path):
    """A previous bundle at --out, checked byte-identical (and nothing hidden beside it) after the case."""
    out = copy_bundle(tiny_bundle, tmp_path, "out")
    before = snapshot(out)
    yield out
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []
