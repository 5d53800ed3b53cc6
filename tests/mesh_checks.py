"""Checks on a 2-D (data x fsdp) mesh, run by tests/test_mesh.py in a subprocess with 8 CPU devices.

``python tests/mesh_checks.py CHECK`` runs one check and prints ``REPORT <json>``:

- ``recipe``: the transformer example, ``examples/transformer_mesh.py`` (AdamW, bfloat16 compute, a
  ``(loss, aux)`` loss, ``probe_loss_fn`` in float32, params sharded over ``fsdp``, batch over ``data``), as written.
- ``fsdp``: XSAM + SGD in float32 with the same sharding, a few steps; params, alpha and probe
  losses are reported for comparison with the same script on one device.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def example(name):
  """The source of ``examples/<name>.py``."""
  return (ROOT / "examples" / f"{name}.py").read_text()


def recipe():
  scope = {"__name__": "__recipe__"}
  exec(compile(example("transformer_mesh"), "examples/transformer_mesh.py", "exec"), scope)
  params = scope["params"]
  return {
    "devices": jax.device_count(),
    "mesh": dict(scope["mesh"].shape),
    "history": scope["history"],
    "sharded": [str(x.sharding.spec) for x in jax.tree.leaves(params)],
    "probe_period": 5,
  }


def fsdp():
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import xsam_jax

  # The recipe's model in float32, with XSAM + SGD (a base optimizer that does not amplify rounding the way
  # Adam's normalisation does at near-zero gradients), 3 steps on fixed data.
  code = example("transformer_mesh").split("loss_bf16, loss_f32 =")[0]
  # A narrower model (width 8, ~1,300 parameters), so that the rounding bound of a norm over the
  # parameters stays below the lead of the winning probe.
  assert "V, D, T = 64, 32, 16" in code
  code = code.replace("V, D, T = 64, 32, 16", "V, D, T = 64, 8, 16")
  scope = {"__name__": "__recipe__"}
  exec(compile(code, "examples/transformer_mesh.py (model)", "exec"), scope)
  mesh, loss32 = scope["mesh"], scope["make_loss"](jnp.float32)
  tx = optax.chain(xsam_jax.xsam(0.05, 1.0, alphas=(0.0, 0.5, 1.0, 1.5, 2.0), alpha_update_period=2), optax.sgd(0.5))
  fsdp_sharding = lambda a: NamedSharding(mesh, P("fsdp") if a.ndim == 2 else P())
  params = jax.tree.map(lambda a: jax.device_put(a, fsdp_sharding(a)), scope["init"](jax.random.key(0)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    loss_fn = lambda p: loss32(p, tokens)
    grads = jax.grad(lambda p: loss_fn(p)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(1)
  T, V = scope["T"], scope["V"]
  probes = []
  for _ in range(3):
    tokens = jnp.asarray((np.arange(T)[None] * rng.integers(1, 5, (16, 1)) + rng.integers(0, V, (16, 1))) % V)
    params, opt_state = step(params, opt_state, jax.device_put(tokens, NamedSharding(mesh, P("data"))))
    probes.append(np.asarray(optax.tree.get(opt_state, "probe_losses")).tolist())
  return {
    "devices": jax.device_count(),
    "num_params": sum(x.size for x in jax.tree.leaves(params)),
    "params": {k: np.asarray(v).tolist() for k, v in params.items()},
    "alpha": float(optax.tree.get(opt_state, "alpha")),
    "probe_losses": probes,
    "sharded": sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)}),
  }


if __name__ == "__main__":
  print("REPORT " + json.dumps({"recipe": recipe, "fsdp": fsdp}[sys.argv[1]]()))
