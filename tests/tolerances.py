"""Float comparisons whose tolerance comes from the computation, not from
what one machine happened to round.

Two float32 programs that compute the same thing (another summation order,
kernel, fusion, thread count, or CPU) differ by rounding that scales with
the magnitudes summed, not with each result: an entry that cancels to near
zero still carries the rounding of its large terms. A per-element rtol, or
an atol of one ulp at the values' scale, then passes here and fails on a CPU
whose kernels add in another order. So these compare a whole set of arrays
(every gradient of one loss, say) against `rel` times the largest magnitude
in the set: rel 1e-5 (~100 ulps) leaves an order of magnitude for short
float32 computations, while a wiring mistake is off by O(1) of the scale.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def scale_of(tree: Any) -> float:
  """The largest finite magnitude over every array of `tree`."""
  leaves = [np.abs(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)]
  return max(float(np.max(a, where=np.isfinite(a), initial=0.0))
             for a in leaves)


def assert_close_at_scale(got: Any, want: Any, rel: float, *,
                          scale: float | None = None, what: str = '') -> None:
  """Every array of `got` within `rel * scale` of `want`'s (same trees);
  `scale` defaults to `scale_of(want)`."""
  scale = scale_of(want) if scale is None else scale
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, jax.tree_util.keystr(path), a.shape,
                                b.shape)
    err = float(np.max(np.abs(a - b), initial=0.0))
    assert err <= rel * scale, (
        f'{what}{jax.tree_util.keystr(path)}: max |diff| {err:.3g} > '
        f'{rel} x scale {scale:.3g}')


def assert_same_training(got: Any, ref: Any, *, steps: int) -> None:
  """Two runs of the same train steps (another mesh layout, attention
  implementation or process count) as saved by tests/parallel_worker.py and
  tests/attention_worker.py: npz-like mappings with 'losses',
  'grad_norms', 'grad[...]' and optionally 'param[...]' arrays.

  Losses and gradient norms agree to 1e-5 relative (sums of many positive
  terms); gradients to 1e-5 of the largest gradient (some are zero in exact
  arithmetic, e.g. the attention key bias, whose gradient is pure rounding).
  The parameters after the steps agree to 1e-4: Adam turns a rounding
  difference dg of a near-zero gradient into an update difference of up to
  lr * dg / eps (the workers' eps 1e-4 keeps that small), while an update
  applied wrongly is off by about lr = 1e-2."""
  assert len(ref['losses']) == steps
  assert np.ptp(ref['losses']) > 1e-3  # the steps train: not a constant
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=1e-5)
  np.testing.assert_allclose(got['grad_norms'], ref['grad_norms'], rtol=1e-5)
  grads = [k for k in ref.keys() if k.startswith('grad[')]
  assert len(grads) >= 10  # every parameter of the family
  assert_close_at_scale({k: got[k] for k in grads}, {k: ref[k] for k in grads},
                        1e-5)
  params = [k for k in ref.keys() if k.startswith('param[')]
  assert_close_at_scale({k: got[k] for k in params},
                        {k: ref[k] for k in params}, 1e-4, scale=1.0)
