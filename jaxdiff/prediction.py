"""What a UNet predicts, and the algebra between its three parametrisations: the one home of it.

With x = alpha * x0 + sigma * eps (VP: alpha = sqrt(alphas_cumprod), sigma = sqrt(1 - alphas_cumprod)):

    epsilon        out = eps
    v_prediction   out = v = alpha * eps - sigma * x0       (Salimans & Ho 2022)
    sample         out = x0

Every conversion is linear in (x, out), so each is a pair of coefficients (a, b) with
result = a * x + b * out. Samplers fold them into their host tables (numpy float64); the training loss
asks for the target of a prediction type. Works on Python floats, numpy and jax arrays alike.
"""
from __future__ import annotations

from jaxdiff.errors import JaxdiffError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TRAINABLE = ("epsilon", "v_prediction")  # what released checkpoints are and the training loss implements


def check(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES, what: str = "prediction_type"):
    """Raises a one-line JaxdiffError unless `prediction_type` is one of `allowed`."""
    if prediction_type not in allowed:
        raise JaxdiffError(f"{what}={prediction_type!r}: expected one of {', '.join(allowed)}")


def x0_coefficients(prediction_type: str, alpha, sigma):
    """(a, b) with x0 = a * x + b * out at x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    check(prediction_type)
    return 0.0 * alpha, 1.0 + 0.0 * alpha  # x0 = out, shaped like alpha


def eps_coefficients(prediction_type: str, alpha, sigma):
    """(a, b) with eps = a * x + b * out at x = alpha * x0 + sigma * eps."""
    if prediction_type == "epsilon":
        return 0.0 * alpha, 1.0 + 0.0 * alpha
    if prediction_type == "v_prediction":
        return sigma, alpha
    check(prediction_type)
    return 1.0 / sigma, -alpha / sigma


def target(prediction_type: str, x0, noise, alpha, sigma):
    """What a model of `prediction_type` should output for z_t = alpha * x0 + sigma * noise."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha * noise - sigma * x0
    check(prediction_type)
    return x0
