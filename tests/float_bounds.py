"""How far apart two compiled programs of the same float32 arithmetic may end, derived, not measured.

XLA may fuse, reorder or contract (a*b+c as one FMA) the same formula differently in two programs, so their
results may differ in the last bits. Each rounding errs by at most half an ulp, a relative ``U = 2**-24`` in
float32; the bounds below count the roundings a result passes through.
"""

import numpy as np

U = 2.0 ** -24
# How many U an Adam(W) update's ratio m_hat / (sqrt(v_hat) + eps) may carry. m is an EMA: each step rounds
# twice and older errors shrink by b1, so m carries at most 2 U / (1 - b1) = 20 U of the terms it sums; where
# those terms cancel, that is relative to the gradients, not to m, and sqrt(v_hat) >= max|g| / sqrt(t) turns it
# into up to 20 U sqrt(t) of the ratio (80 U for t <= 16). v adds 3 U a step (halved by the sqrt), the bias
# corrections, eps, the division, the learning rate and the weight decay a few more: 100 in all.
ADAM_ROUNDINGS = 100
# |m_hat / (sqrt(v_hat) + eps)| <= (1 - b1) / sqrt(1 - b2) * (1 / (1 - b1^t)) * sqrt(1 - b2^t): at most ~3.2 for
# optax's defaults (b1 0.9, b2 0.999) in the first steps, and below 1 later; 4 covers every step.
ADAM_MAX_RATIO = 4.0


def assert_adam_runs_agree(a, b, *, steps: int, lr: float) -> None:
  """Weights after ``steps`` Adam(W) updates, given the same gradients, computed by two programs.

  Every step's update (about ``lr`` in size) may differ by ADAM_ROUNDINGS relative roundings, and adding it to
  the weight rounds once more (half an ulp of the weight). A wrong update (a missing mask, a stale or reset
  moment, another formula) moves a weight by about ``lr``: more than 10^4 times more. Valid for up to 16 steps.
  """
  assert steps <= 16, "ADAM_ROUNDINGS is derived for up to 16 steps"
  np.testing.assert_allclose(a, b, rtol=steps * U, atol=steps * ADAM_ROUNDINGS * U * lr * ADAM_MAX_RATIO)


def assert_moments_agree(a, b, *, steps: int) -> None:
  """Adam moments after ``steps`` updates computed by two programs: each step's few roundings (relative to the
  moment's largest entry, since a sum of terms of either sign can cancel to near 0)."""
  a, b = np.asarray(a), np.asarray(b)
  scale = float(np.abs(b).max()) if b.size else 0.0
  np.testing.assert_allclose(a, b, rtol=0, atol=steps * ADAM_ROUNDINGS * U * scale)


def summed_gradient_error(largest: float, terms: int) -> float:
  """How far a gradient entry may move when another program sums its ``terms`` contributions in another order.

  Each partial sum rounds once: at most ``terms * U`` relative to the entry, for sums without heavy
  cancellation (the same reading as tests/test_importance_measurement.py); in absolute terms at most
  ``terms * U`` times ``largest``, a bound on the entries (the largest one, or a norm of them).
  """
  return terms * U * largest


def adam_atol_for_gradient_error(*, steps: int, lr: float, eps: float, grad_error: float) -> float:
  """Largest weight difference after ``steps`` Adam(W) updates whose gradients differ by ``grad_error``.

  The bias-corrected moments are weighted means of the gradients, so they move by at most ``grad_error``
  (and sqrt(v) by at most ``grad_error``); the update lr * m / (sqrt(v) + eps) then moves by at most
  lr * grad_error * (1 + ADAM_MAX_RATIO) / eps. Adam's own eps makes this finite: at optax's default 1e-8 a
  near-zero gradient's rounding noise can become a whole step of ~lr, so tests that compare two programs
  through Adam give it an eps that sets the scale.
  """
  return steps * lr * grad_error * (1 + ADAM_MAX_RATIO) / eps


def assert_adam_runs_agree_given_gradient_error(a, b, *, steps: int, lr: float, eps: float,
                                                grad_error: float) -> float:
  """Weight trees of two Adam(W) runs whose gradients differ by ``grad_error`` (:func:`adam_atol_for_gradient_error`),
  plus the weights' own rounding at each step; returns the absolute tolerance used."""
  import jax
  atol = adam_atol_for_gradient_error(steps=steps, lr=lr, eps=eps, grad_error=grad_error)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=steps * U, atol=atol), a, b)
  return atol
