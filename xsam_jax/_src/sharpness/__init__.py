"""Sharpness toolkit: Hessian spectra, average sharpness and loss surfaces.

Three ways to look at how sharp a minimum is, all working on pytrees of
parameters and a scalar ``loss_fn(params)`` (or a ``(loss, aux)`` pair, whose
``aux`` is ignored). One module each; the public names are re-exported by
``xsam_jax.sharpness``:

* ``hessian``: the top eigenvalues (and eigenvectors) of the Hessian, from
  forward-over-reverse Hessian-vector products (``xsam_jax._src.hvp``) and
  JAX's maintained LOBPCG solver
  (``jax.experimental.sparse.linalg.lobpcg_standard``);
* ``directions``: random directions normalized to the parameters' scale
  (Li et al. 2018), singly or as a plane;
* ``perturbations``: losses along such directions and average sharpness, the
  mean loss increase along them;
* ``surface``: the loss on a grid over a plane through ``params``;
* ``plane``: XSAM's own search plane with the SGD, SAM and XSAM directions
  (the XSAM paper's Fig. 1a), computed by XSAM's own plane code
  (``xsam_jax._src.xsam``);
* ``plots``: matplotlib drawings of the surfaces and of the plane.

matplotlib is imported lazily inside the plotting functions only.
"""
