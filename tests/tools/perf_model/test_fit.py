"""The affine fit over the layer count (torchtitan_upipe.tools.perf_model.fit)."""

import pytest

from torchtitan_upipe.tools.perf_model.fit import AffineFit, extrapolated_tps, fit_two


def test_fit_is_exact_on_affine_data():
    f = fit_two(1, 10.5, 2, 12.0)
    assert f == AffineFit(1.5, 9.0)
    assert f(32) == pytest.approx(57.0)
    assert f.relative_error(32, 57.0) == pytest.approx(0.0)
    assert f.relative_error(32, 50.0) == pytest.approx(7 / 50)
    assert extrapolated_tps(131072, 8, 2.0) == pytest.approx(8192.0)
    with pytest.raises(ValueError):
        fit_two(2, 1.0, 2, 3.0)
