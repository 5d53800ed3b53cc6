"""``probe_batch_size="auto"`` under a memory budget: the rule, where the budget comes from, and XLA's
own peak of the compiled probe step against SAM's (experiments/bench/probe_memory.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xsam_jax
from experiments.bench import probe_memory as bench_probe_memory
from xsam_jax._src import xsam as xsam_lib
from xsam_jax._src.xsam import free_memory_budget, resolve_probe_batch_size, tree_bytes

N = len(xsam_jax.DEFAULT_ALPHAS)
PARAMS = {"w": jnp.zeros((50, 20)), "b": jnp.zeros((20,), jnp.bfloat16)}  # 4000 + 40 bytes
P = 4040


def test_tree_bytes_counts_size_times_itemsize_of_every_leaf():
  assert tree_bytes(PARAMS) == P
  assert tree_bytes(jax.eval_shape(lambda: PARAMS)) == P  # static shapes are enough (tracers at trace time)
  assert tree_bytes({"w": None, "b": PARAMS["b"]}) == 40  # leaves a perturb_mask leaves out are None


@pytest.mark.parametrize(
  ("budget", "chunk"),
  [(1, 1), (P - 1, 1), (P, 1), (2 * P, 2), (7 * P + P // 2, 7), ((N - 1) * P, N - 1), (N * P, None), (10**12, None)],
)
def test_auto_is_the_largest_chunk_whose_copies_fit_the_budget(budget, chunk):
  assert resolve_probe_batch_size("auto", PARAMS, N, memory_budget=budget) == chunk


def test_auto_without_a_budget_is_sequential_on_cpu_and_other_values_pass_through():
  assert jax.default_backend() == "cpu"
  assert resolve_probe_batch_size("auto", PARAMS, N) == 1
  assert resolve_probe_batch_size("auto") == 1  # no params: the backend's label
  for value in (None, 1, 5):
    assert resolve_probe_batch_size(value, PARAMS, N, memory_budget=10**12) == value


class _Device:
  def __init__(self, stats):
    self.stats = stats

  def memory_stats(self):
    if isinstance(self.stats, Exception):
      raise self.stats
    return self.stats


def test_free_memory_budget_is_a_fraction_of_the_free_bytes():
  stats = {"bytes_limit": 10_000, "bytes_in_use": 2_000, "peak_bytes_in_use": 9_000}
  assert free_memory_budget(_Device(stats)) == int(xsam_lib.PROBE_MEMORY_FRACTION * 8_000)
  assert free_memory_budget(_Device({"bytes_limit": 10, "bytes_in_use": 20})) == 0
  for unknown in (None, {}, {"bytes_in_use": 5}, NotImplementedError(), RuntimeError("no stats")):
    assert free_memory_budget(_Device(unknown)) is None
  assert free_memory_budget() is None  # XLA's CPU client reports no memory statistics


@pytest.mark.parametrize(
  ("device_budget", "explicit", "chunk"),
  [(5 * P, None, 5), (10**12, None, None), (0, None, 1), (None, None, 1), (None, 3 * P, 3), (10**12, 2 * P, 2)],
)
def test_auto_off_cpu_reads_the_devices_free_memory(monkeypatch, device_budget, explicit, chunk):
  """Off CPU: the device's budget (1 where it reports none); an explicit budget overrides it."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(xsam_lib, "free_memory_budget", lambda: device_budget)
  assert resolve_probe_batch_size("auto", PARAMS, N, memory_budget=explicit) == chunk
  assert resolve_probe_batch_size("auto") is None  # no params: the backend's label


def _traced_batch_sizes(monkeypatch, tx, params):
  """The ``batch_size`` the probes of ``tx``'s update are traced with."""
  seen = []

  def spy(fn, xs, batch_size):
    seen.append(batch_size)
    return jax.vmap(fn)(xs)

  monkeypatch.setattr(xsam_lib, "map_batched", spy)
  loss_fn = lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in jax.tree.leaves(p))
  jax.eval_shape(lambda p: tx.update(jax.grad(loss_fn)(p), tx.init(p), p, loss_fn=loss_fn), params)
  return seen


@pytest.mark.parametrize(("budget", "chunk"), [(None, 1), (P, 1), (4 * P, 4), (N * P, None)])
def test_xsam_probes_with_the_resolved_chunk(monkeypatch, budget, chunk):
  tx = xsam_jax.xsam(0.1, 0.2, alpha_update_period=1, probe_memory_budget=budget)
  assert _traced_batch_sizes(monkeypatch, tx, PARAMS) == [chunk]


def test_the_budget_counts_the_perturbed_leaves_only(monkeypatch):
  """With ``perturb_mask`` the probes copy the masked-in leaves only: ``b``'s 40 bytes here."""
  tx = xsam_jax.xsam(0.1, 0.2, alpha_update_period=1, probe_memory_budget=200, perturb_mask={"w": False, "b": True})
  assert _traced_batch_sizes(monkeypatch, tx, PARAMS) == [5]


def test_probe_step_peak_is_sams_plus_the_chunks_copies(tmp_path):
  """XLA's temporaries of the compiled probe step <= SAM's + c P + 2 P + c F (the bench's bound, derived there).

  ``python -m experiments.bench_probe_memory --quick`` as docs/performance.md shows it: a 0.1M-parameter MLP; budgets
  of 0.5 P (a scan), 4 P (chunks of 4) and all 21 probes (one vmap).
  """
  c = bench_probe_memory.ProbeMemoryConfig.quick()
  params, _ = bench_probe_memory.mlp_problem(c.inputs, c.width, c.depth, c.batch)
  p = tree_bytes(params)
  assert 10**5 <= p // 4 <= 10**6
  report = bench_probe_memory.main(["--quick", "--out", str(tmp_path)])
  assert json.loads((tmp_path / "probe_memory.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))
  assert report["param_bytes"] == p
  rows = report["rows"]
  assert [r["chunk"] for r in rows] == [1, 4, None]
  for r in rows:
    assert r["xsam_temp_bytes"] <= r["bound_bytes"], r
  temps = [r["xsam_temp_bytes"] for r in rows]
  # The budget is honoured: each chunk's copies are in the peak, and a smaller chunk needs less.
  assert np.all(np.diff(temps) > 0)
  assert temps[-1] - temps[0] >= (N - 1) * p
  assert report["all_within_bound"]
  table = bench_probe_memory.format_rows(report)
  assert [line.split()[2] for line in table[2:-1]] == ["1", "4", "vmap"]
  assert all(line.endswith(" yes") for line in table[2:-1])
