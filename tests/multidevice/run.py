"""Data-parallel checks on 8 CPU devices, run by ``tests/test_multidevice.py``.

The device count is fixed when jax starts, so these checks run in their own
process: ``python tests/multidevice/run.py [SUBSTRING ...]`` (it asks for
8 host devices itself unless ``XLA_FLAGS`` already sets a count). Each check
prints ``ok <name>``; the process exits non-zero if any check fails.

With ``--process-id I --num-processes 2 --port PORT`` (and 4 devices per
process) it joins a local two-process CPU cluster and runs the multi-host
checks instead (``tests/test_multidevice.py`` starts both processes).

The checks live by mode in this folder (``global_mode``, ``axis_name_mode``, ``m_sharpness_mode``,
``multiprocess_mode``) over ``common`` (problem, reference, tolerances) and ``snippets`` (the code
docs/scaling-out.md shows by ``literalinclude``; the multi-host setup snippet is below).

Modes checked, for SAM and XSAM with K = 1 and 3 and probes every 1 or 2
steps:

1. global: no ``axis_name``; ``jax.jit`` over a batch sharded with
   ``NamedSharding`` equals the single-device run on the same global batch.
2. explicit collectives: ``axis_name="batch"`` inside ``jax.shard_map``
   (default ``check_vma=True``, also ``False``) and ``jax.pmap``; every
   replica holds the same parameters and alpha, equal to the single-device
   run. Also with ``g_0`` from varying params and with an already averaged
   loss.
3. m-sharpness: ``m_sharpness=True``; replicas agree with each other, the
   result differs from the global one, shard_map equals pmap, and one SAM
   step equals a per-shard computation written out by hand.
"""

import os
import sys
import time
import traceback

# ``--process-id I --num-processes N --port PORT``: join a local CPU cluster
# of N processes with 8 // N devices each (the multi-process checks).
CLUSTER = None
if "--process-id" in sys.argv:
  _args = dict(zip(sys.argv[1::2], sys.argv[2::2], strict=True))
  CLUSTER = {k: int(_args["--" + k.replace("_", "-")]) for k in ("process_id", "num_processes", "port")}
  _flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
  _devices = 8 // CLUSTER["num_processes"]
  os.environ["XLA_FLAGS"] = " ".join([*_flags, f"--xla_force_host_platform_device_count={_devices}"])
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if CLUSTER is not None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPU/TPU need nothing
  coordinator_address = f"localhost:{CLUSTER['port']}"
  num_processes, process_id = CLUSTER["num_processes"], CLUSTER["process_id"]
  # [snippet: multi-host]
  jax.distributed.initialize(  # on every process, before any other JAX call
    coordinator_address=coordinator_address,  # "host:port" of process 0
    num_processes=num_processes,
    process_id=process_id,
  )  # on TPU, Slurm or Open MPI: jax.distributed.initialize() finds these itself
  # [end snippet]

# The checks register themselves (common.CHECKS, common.MULTIPROCESS_CHECKS) when imported, in this order.
import axis_name_mode  # noqa: F401
import global_mode  # noqa: F401
import jax
import m_sharpness_mode  # noqa: F401
import multiprocess_mode  # noqa: F401
from common import CHECKS, MULTIPROCESS_CHECKS


def main(argv):
  assert jax.device_count() == 8, f"expected 8 devices, got {jax.device_count()}"
  argv = [a for a in argv if not a.startswith("--") and not a.isdigit()]
  pool = CHECKS if CLUSTER is None else MULTIPROCESS_CHECKS
  selected = [c for c in pool if not argv or any(a in c.__name__ for a in argv)]
  failed = []
  start = time.perf_counter()
  for fn in selected:
    t0 = time.perf_counter()
    try:
      fn()
    except Exception:  # noqa: BLE001 - report every failing check, then fail
      failed.append(fn.__name__)
      print(f"FAIL {fn.__name__}")
      traceback.print_exc()
    else:
      print(f"ok   {fn.__name__} ({time.perf_counter() - t0:.1f}s)")
    sys.stdout.flush()
  print(f"{len(selected) - len(failed)}/{len(selected)} checks passed in {time.perf_counter() - start:.1f}s")
  if failed:
    print("FAILED: " + ", ".join(failed))
    return 1
  print("ALL CHECKS PASSED")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
