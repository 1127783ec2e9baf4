"""jaxdiff.prediction: the eps / v / x0 algebra shared by samplers and the training loss."""
import numpy as np
import pytest

from jaxdiff import prediction
from jaxdiff.errors import JaxdiffError


@pytest.mark.parametrize("kind", prediction.PREDICTION_TYPES)
def test_coefficients_recover_x0_and_eps_from_the_target(kind):
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 5))
    ab = rng.uniform(0.01, 0.99, 5)
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
    x = alpha * x0 + sigma * eps
    out = prediction.target(kind, x0, eps, alpha, sigma)
    a, b = prediction.x0_coefficients(kind, alpha, sigma)
    np.testing.assert_allclose(a * x + b * out, x0, rtol=1e-12, atol=1e-12)
    a, b = prediction.eps_coefficients(kind, alpha, sigma)
    np.testing.assert_allclose(a * x + b * out, eps, rtol=1e-10, atol=1e-10)


def test_v_is_salimans_and_ho():
    np.testing.assert_allclose(prediction.target("v_prediction", 2.0, 3.0, 0.6, 0.8), 0.6 * 3.0 - 0.8 * 2.0)


def test_unknown_type_is_one_line():
    with pytest.raises(JaxdiffError, match="expected one of epsilon, v_prediction, sample"):
        prediction.target("flow", 1.0, 1.0, 1.0, 1.0)
