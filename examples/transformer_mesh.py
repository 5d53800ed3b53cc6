"""XSAM on a small transformer: AdamW, bfloat16 compute, a ``(loss, aux)`` loss, params on a 2-D mesh.

In the global ``jax.jit`` mode (no ``axis_name``) parameters may be sharded any way XLA supports:
here the matrices' rows over an ``fsdp`` axis and the batch over ``data``. A ``(loss, aux)`` loss is
accepted as ``loss_fn`` (aux is ignored). In bfloat16 the probe losses differ by less than
bfloat16's rounding, so ``probe_loss_fn=`` evaluates XSAM's probes with the float32 model while the
ascent runs in bfloat16.

    python examples/transformer_mesh.py
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/transformer_mesh.py   # a 4 x 2 mesh
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xsam_jax

V, D, T = 64, 32, 16  # vocabulary, width, sequence length
n = jax.device_count()
auto = (jax.sharding.AxisType.Auto,) * 2  # XLA inserts the collectives (the global jit mode)
mesh = jax.make_mesh((max(n // 2, 1), min(n, 2)), ("data", "fsdp"), axis_types=auto)  # data x fsdp


def init(key):
  k = iter(jax.random.split(key, 8))
  w = lambda *s: jax.random.normal(next(k), s) / np.sqrt(s[0])
  return {
    "embed": w(V, D),
    "wq": w(D, D),
    "wk": w(D, D),
    "wv": w(D, D),
    "wo": w(D, D),
    "w1": w(D, 4 * D),
    "w2": w(4 * D, D),
    "ln1": jnp.ones(D),
    "ln2": jnp.ones(D),
  }


def make_loss(dtype):  # the model computes in `dtype`; the loss is reduced in float32
  def loss_fn(params, tokens):
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    norm = lambda h, s: h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6) * s[None, None, :]
    h = p["embed"][tokens[:, :-1]]
    a = norm(h, p["ln1"])
    q, k, v = a @ p["wq"], a @ p["wk"], a @ p["wv"]
    mask = jnp.tril(jnp.ones((1, T - 1, T - 1), bool))
    att = jax.nn.softmax(jnp.where(mask, q @ k.swapaxes(1, 2) / np.sqrt(D), -1e4).astype(jnp.float32), -1)
    h = h + (att.astype(dtype) @ v) @ p["wo"]
    h = h + jax.nn.gelu(norm(h, p["ln2"]) @ p["w1"]) @ p["w2"]
    logits = (h @ p["embed"].T).astype(jnp.float32)
    labels = tokens[:, 1:]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}  # (loss, aux)

  return loss_fn


loss_bf16, loss_f32 = make_loss(jnp.bfloat16), make_loss(jnp.float32)
tx = optax.chain(
  xsam_jax.xsam(rho=0.05, rho_max=0.05, alpha_update_period=5),  # first: it needs the raw gradient
  optax.clip_by_global_norm(1.0),  # clipping and weight decay act on the sharpness-aware gradient
  optax.adamw(3e-3, weight_decay=0.01),
)
fsdp = lambda a: NamedSharding(mesh, P("fsdp") if a.ndim == 2 else P())  # shard matrices' rows over fsdp
params = jax.tree.map(lambda a: jax.device_put(a, fsdp(a)), init(jax.random.key(0)))
opt_state = tx.init(params)


@jax.jit
def train_step(params, opt_state, tokens):
  (loss, aux), grads = jax.value_and_grad(loss_bf16, has_aux=True)(params, tokens)
  updates, opt_state = tx.update(
    grads,
    opt_state,
    params,
    loss_fn=lambda p: loss_bf16(p, tokens),  # (loss, aux) is accepted; aux is ignored
    probe_loss_fn=lambda p: loss_f32(p, tokens),  # XSAM's probes in float32 (bf16 rounding > their differences)
  )
  return optax.apply_updates(params, updates), opt_state, loss, aux


rng = np.random.default_rng(0)
history = []  # (loss, alpha) per step
for _ in range(10):
  tokens = jnp.asarray((np.arange(T)[None] * rng.integers(1, 5, (16, 1)) + rng.integers(0, V, (16, 1))) % V)
  tokens = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  params, opt_state, loss, aux = train_step(params, opt_state, tokens)
  history.append((float(loss), float(optax.tree.get(opt_state, "alpha"))))
print(f"loss {loss:.3f}  accuracy {aux['accuracy']:.2f}  alpha {optax.tree.get(opt_state, 'alpha'):.1f}")
