"""The Hessian-vector product, used by EigenSAM's power iteration and by the sharpness toolkit."""

from __future__ import annotations

import jax

from xsam_jax._src import tree_math as tm
from xsam_jax._src import validation
from xsam_jax._src.types import LossFn, PyTree


def hessian_vector_product(loss_fn: LossFn, params: PyTree, vector: PyTree) -> PyTree:
  r"""The Hessian of ``loss_fn`` at ``params`` applied to ``vector``.

  .. math::

    H v = \left.\frac{d}{dt} \nabla L(w + t v)\right|_{t=0},

  computed forward-over-reverse (``jax.jvp`` of ``jax.grad``): one forward
  and one backward pass with tangents, about the cost of two gradients, and
  no Hessian is ever formed.

  Args:
    loss_fn: ``params -> scalar`` (a fixed batch).
    params: the point ``w``, any pytree of float arrays.
    vector: a pytree with the structure and shapes of ``params`` (cast to
      the params' dtypes); anything else is a ``ValueError`` naming ``vector``.

  Returns:
    ``H v``, a pytree like ``params`` (in the params' dtypes).

  Example:
    >>> import jax.numpy as jnp
    >>> loss_fn = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p["w"] ** 2)
    >>> hv = hessian_vector_product(loss_fn, {"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
    >>> [float(x) for x in hv["w"]]
    [1.0, 3.0]

  References:
    Pearlmutter, Fast exact multiplication by the Hessian, Neural
    Computation 1994.
  """
  validation.check_like_params("hessian_vector_product", "vector", vector, params)
  vector = tm.tree_cast_like(vector, params)
  loss_fn = validation.scalar_loss("hessian_vector_product", loss_fn)
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]
