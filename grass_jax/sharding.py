"""Data parallelism and FSDP-style parameter sharding over a device mesh.

The mesh has two axes: ``data`` (replicas that each see a slice of the batch) and
``fsdp`` (devices that also split every large parameter and optimizer-state array).
The batch is split over both axes. Each large array is split along its largest
dimension that ``fsdp`` divides; small ones (norms of small models, the GRASS statistics,
PRNG keys, the active-layer indices) are replicated, so every device draws the same layers.
A stacked layer leaf ``[L, ...]`` and one layer's slot ``[...]`` choose the same
dimension (``L`` is never the largest), so gathering the active layers is local and
offloaded host copies keep the device layout.

Example::

  mesh = make_mesh(data=2, fsdp=2)                   # 4 devices
  params = jax.device_put(params, tree_shardings(params, mesh))
  opt_state = jax.device_put(opt_state, tree_shardings(opt_state, mesh))
  batch = shard_batch(numpy_batch, batch_sharding(mesh))
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grass_jax.errors import MeshError

DATA, FSDP = "data", "fsdp"
# A dimension is split only if every device keeps at least this many rows of it: smaller arrays
# (norms, GRASS statistics) stay replicated. The rule looks at one dimension, never at the
# total size, so a stacked [L, ...] leaf and one layer's [...] slot always decide alike.
MIN_ROWS_PER_DEVICE = 64


def make_mesh(data: int | None = None, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices; ``data`` default: the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  if fsdp < 1 or (data is not None and data < 1):
    raise MeshError(f"mesh.data and mesh.fsdp must be >= 1; got data={data}, fsdp={fsdp}")
  if data is None:
    if len(devices) % fsdp:
      raise MeshError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    data = len(devices) // fsdp
  if data * fsdp > len(devices):
    raise MeshError(f"mesh data x fsdp = {data} x {fsdp} needs {data * fsdp} devices; {len(devices)} are visible "
                    f"({devices[0].platform}). Lower mesh.data / mesh.fsdp.")
  return Mesh(np.array(devices[:data * fsdp]).reshape(data, fsdp), (DATA, FSDP))


def leaf_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The partition spec of one array: its largest ``fsdp``-divisible dimension on ``fsdp``."""
  dims = [i for i in range(len(shape)) if shape[i] % fsdp == 0 and shape[i] // fsdp >= MIN_ROWS_PER_DEVICE]
  if fsdp == 1 or not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], i))
  return P(*[FSDP if i == best else None for i in range(len(shape))])


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """``NamedSharding`` per array of ``tree`` (params or optimizer state) on ``mesh``."""
  fsdp = mesh.shape[FSDP]

  def one(x):
    if not hasattr(x, "shape") or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, leaf_spec(tuple(x.shape), fsdp))

  return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches ``[grad_accum, B, T]``: ``B`` split over every device of the mesh."""
  return NamedSharding(mesh, P(None, (DATA, FSDP), None))


def activation_sharding(mesh: Mesh) -> NamedSharding:
  """Activations ``[B, T, H, hd]`` inside the model: ``B`` split like the batch, the rest whole."""
  return NamedSharding(mesh, P((DATA, FSDP), None, None, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises :class:`MeshError` unless every device of ``mesh`` gets the same number of rows."""
  if batch_size % mesh.size:
    raise MeshError(f"train.batch_size={batch_size} must be a multiple of the {mesh.size} devices of the mesh "
                    f"(mesh.data x mesh.fsdp = {dict(mesh.shape)}); set train.batch_size to a multiple of {mesh.size}")


def shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global host batch -> sharded device arrays; each process fills only its own devices.

  Every process holds the same global batch (the data order is a function of the seed),
  so this works unchanged with several hosts.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    check_batch_size(v.shape[1], sharding.mesh)
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` once, before anything touches a device (several hosts).

  The coordinator address, process count and id come from the environment (SLURM, Open MPI,
  or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``).
  """
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
