"""Training controls: a radius that follows the learning rate, a mask, cheap SAM, a sharpness monitor.

``rho`` may be an optax schedule (here proportional to the learning rate, clamped at 0 during
warm-up); ``perturb_mask`` perturbs only some leaves; ``perturb_every=2`` runs the extra pass on every
other step; every state keeps ``perturbed_loss``, ``L(w + d)``, at no extra cost.

    python examples/controls.py
"""

import jax
import jax.numpy as jnp
import optax

import xsam_jax

params = {"w": jnp.array([[1.0, -0.5], [0.3, 0.8]]), "b": jnp.array([0.1, -0.2])}
loss_fn = lambda p: jnp.sum(jnp.tanh(p["w"] @ jnp.array([1.0, 2.0]) + p["b"]) ** 2)
lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=2, decay_steps=20)
tx = optax.chain(
  xsam_jax.sam(
    xsam_jax.rho_schedule_from_lr(lr, rho_max=0.05),  # rho follows the learning rate
    perturb_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),  # no bias is perturbed
    perturb_every=2,  # the ascent runs on every other step
  ),
  optax.sgd(lr, momentum=0.9),
)
state = tx.init(params)
for step in range(4):
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = tx.update(grads, state, params, loss_fn=loss_fn)
  params = optax.apply_updates(params, updates)
  if step % 2 == 0:  # a perturbed step: L(w + d) - L(w) of this step
    print(f"step {step}: loss {loss:.4f}, sharpness {optax.tree.get(state, 'perturbed_loss') - loss:.4f}")
