"""The condition channels of a conditional β-VAE: scaled over the training windows, kept by the
detector, appended after the signals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from millvae.data.conditions import ConditionScale
from millvae.errors import MillvaeError


def _conditions(doc, feed, material):
    return pd.DataFrame({"DOC": doc, "feed": feed, "material": material})


def test_scale_maps_the_training_range_to_0_1_and_keeps_a_constant_at_0():
    train = _conditions([0.75, 1.5, 1.5], [0.25, 0.25, 0.25], [1, 2, 1])
    scale = ConditionScale.fit(train)
    got = scale.transform(_conditions([0.75, 1.5, 3.0], [0.25, 0.5, 0.25], [2, 1, 2]))
    # feed never varied in training: no scale to learn, every value maps to 0
    np.testing.assert_allclose(got, [[0, 0, 1], [1, 0, 0], [3, 0, 1]])
    assert got.dtype == np.float32
    again = ConditionScale.from_dict(scale.to_dict())
    assert again == scale


def test_append_adds_constant_channels_after_the_signals():
    scale = ConditionScale.fit(_conditions([0.75, 1.5], [0.25, 0.5], [1, 2]))
    x = np.arange(2 * 4 * 2, dtype=np.float32).reshape(2, 4, 2)
    out = scale.append(x, _conditions([1.5, 0.75], [0.25, 0.5], [1, 2]))
    assert out.shape == (2, 4, 5)
    np.testing.assert_array_equal(out[..., :2], x)
    np.testing.assert_array_equal(out[0, :, 2:], np.tile([1, 0, 0], (4, 1)))
    np.testing.assert_array_equal(out[1, :, 2:], np.tile([0, 1, 1], (4, 1)))
    with pytest.raises(MillvaeError, match="one row per window"):
        scale.append(x, _conditions([1.5], [0.25], [1]))


def test_no_training_windows_is_refused_in_one_line():
    with pytest.raises(MillvaeError, match="conditional: expected training windows"):
        ConditionScale.fit(_conditions([], [], []))
