"""Host-offloaded per-layer optimizer state, swapped at layer switches.

With ``grass_jax.transform(..., offload=True)`` the optimizer state on the
device holds the inner states of the ``gamma`` active layers only (plus the
always-on group). :class:`Offloader` keeps every other layer's state in
``pinned_host`` memory and swaps layers at each switch:

* the set of the next period is drawn one step before the switch
  (``GrassState.next_active``). The offloader reads it only after the *next*
  step has been dispatched, so the read never stalls the device;
* at the switch, outgoing layers' states are copied device->host and the
  incoming ones host->device into their slots. Layers that stay active do
  not move.

The swap waits for the period's last step to finish, and for its copies, so
the device never holds the incoming layers' states beside that step's own (one
slot set: ``gamma`` layers' moments), for one pause of the copy time per
period. Issuing the copies while that step computes (a ``prefetch`` option
until 2026-12-07) measured slower and used more memory (docs/offloading.md).

Between switches nothing waits on the device except that one small read of
``next_active`` from the step before, which has finished by then or is about to.

The few lines a user adds to a training loop::

  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   grass_jax.transform(optax.adamw(1e-5), layers=..., num_active=2,
                                       period=20, offload=True))
  opt_state = tx.init(params)
  # Commit the state to the device once, so the step compiles once (jit outputs are committed).
  params, opt_state = jax.device_put((params, opt_state), jax.devices()[0])
  offloader = grass_jax.offload.Offloader(opt_state, period=20)
  for batch in batches:
    params, opt_state, loss = train_step(params, opt_state, batch)   # jitted, async
    opt_state = offloader.after_step(opt_state)

Results are identical with and without offloading (tested bitwise on CPU).

**Streaming** (``Offloader(..., stream=True)``): the active layers' states live
in host memory too. The train step (``StepOptions(stream_states=True)``)
copies the active layers' states to the device for their update after the
backward pass, one weight matrix at a time (``by_leaf``; or one layer at a
time), and copies them back: device memory then holds about two matrices'
moments instead of ``gamma`` layers', for two host<->device copies of each
active layer's state every step (docs/offloading.md measures both).
``inner.init`` must depend on parameter shapes only (true for adam, adamw,
sgd, lion, adafactor, ...): a layer never trained before starts from a copy of
the fresh state of the first slot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grass_jax.schedule import Schedule
from grass_jax.layer_updates import StateStream
from grass_jax.transform import find_state, replace_state


def memory_kind(tree: Any) -> set[str]:
  """Memory kinds of the arrays in ``tree`` (e.g. ``{'pinned_host'}``)."""
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def _shardings(tree: Any, kind: str) -> Any:
  """The shardings of ``tree``'s arrays (single device or a mesh) in memory ``kind``."""
  return jax.tree.map(lambda x: x.sharding.with_memory_kind(kind), tree)


def _device_kind(tree: Any) -> str:
  return next(iter(jax.tree.leaves(tree)[0].devices())).default_memory().kind


def host_slot_states(opt_state: Any, shardings: Any, host_memory_kind: str = "pinned_host") -> tuple[Any, Any]:
  """``(opt_state, shardings)`` with the active layers' states (``slot_states``) moved to host memory.

  For streaming: pass the results to the train step (its in/out shardings) and to
  ``Offloader(..., stream=True)``.
  """
  host = host_slot_shardings(shardings, host_memory_kind)
  s = find_state(opt_state)
  moved = jax.device_put(s.slot_states, find_state(host).slot_states)
  return replace_state(opt_state, s._replace(slot_states=moved)), host


def host_slot_shardings(shardings: Any, host_memory_kind: str = "pinned_host") -> Any:
  """The optimizer state's shardings with the active layers' states (``slot_states``) in host memory:
  :func:`host_slot_states` without moving anything (to compile the streaming step ahead of time)."""
  sh = find_state(shardings)
  host_sh = jax.tree.map(lambda x: x.with_memory_kind(host_memory_kind), sh.slot_states)
  return replace_state(shardings, sh._replace(slot_states=host_sh))


def state_stream(host_shardings: Any, device_memory_kind: str = "device", by_leaf: bool = True) -> StateStream:
  """The :class:`~grass_jax.layer_updates.StateStream` for one slot's host shardings (use inside jit).

  The barrier ties each fetch to an earlier update (or the gradients), so a state comes to the device
  only when it is needed. ``by_leaf``: one weight matrix's state at a time (the default), else one
  layer's (see :class:`~grass_jax.layer_updates.StateStream`).
  """
  def shardings(part: Any) -> Any:
    return host_shardings if part is None else part(host_shardings)

  def fetch(state: Any, after: Any, part: Any = None) -> Any:
    state, _ = jax.lax.optimization_barrier((state, after))
    return jax.device_put(state, jax.tree.map(lambda x: x.with_memory_kind(device_memory_kind), shardings(part)))

  return StateStream(fetch=fetch, store=lambda state, part=None: jax.device_put(state, shardings(part)),
                     by_leaf=by_leaf)


class Offloader:
  """Keeps inactive layers' inner-optimizer states in host memory; see the module docstring.

  Attributes:
    bank: ``{layer: state}`` host-resident states of layers that were trained
      and are now inactive.
    fresh: host copy of a never-trained layer's state.
    step: the host's count of optimizer steps (mirrors ``GrassState.count``).
  """

  def __init__(self, opt_state: Any, *, period: int, host_memory_kind: str = "pinned_host",
               bank: dict[int, Any] | None = None, fresh: Any = None, preallocate: bool = True,
               stream: bool = False):
    """Args:
      opt_state: the optimizer state right after ``init`` (or restored, with
        ``bank`` and ``fresh``; see :meth:`restore`).
      period: the transform's ``period``.
      host_memory_kind: where inactive states live ('pinned_host').
      bank, fresh: saved host states to resume from (:meth:`checkpoint_tree`).
      preallocate: create every inactive layer's host state now (L x one
        layer's optimizer state of host memory), so that no switch pays for
        pinning new host memory.
      stream: the active layers' states are in host memory too
        (:func:`host_slot_states`); a switch then moves no data.
    """
    if period < 1:
      raise ValueError(f"period must be >= 1; got {period}")
    self.period = period
    self.schedule = Schedule(period)  # when the incoming layers' states are swapped in (after a period's last step)
    s = find_state(opt_state)
    if s.bank is not None:
      raise ValueError("the optimizer state keeps its own bank; build the transform with offload=True")
    if not isinstance(s.slot_states, tuple) or s.active.shape[0] == s.importance.shape[0]:
      raise ValueError("nothing to offload: all layers are active (full fine-tuning)")
    self.num_layers = int(s.importance.shape[0])
    self.num_active = int(s.active.shape[0])
    # Per-leaf shardings: host copies keep the device layout (one device, or a mesh with FSDP).
    self.host = _shardings(s.slot_states[0], host_memory_kind)
    self.stream = stream
    if stream and memory_kind(s.slot_states) != {host_memory_kind}:
      raise ValueError("stream=True needs the active layers' states in host memory: "
                       "opt_state, shardings = host_slot_states(opt_state, shardings) first")
    # Where active layers' states live: the device, or the host when streaming.
    self.on_device = self.host if stream else _shardings(s.slot_states[0], _device_kind(s.slot_states))
    # The only host reads outside the loop: where we start from.
    self.step = int(s.count)
    self.slot_layers = [int(x) for x in np.asarray(s.slot_layers)]
    if self.slot_layers != [int(x) for x in np.asarray(s.active)]:
      raise ValueError("the state is between a switch and its swap; pass the state right after after_step")
    if fresh is None:
      if self.step != 0:
        raise ValueError("resuming an offloaded state needs the saved `bank` and `fresh` (Offloader.restore)")
      fresh = s.slot_states[0]
    # Copies, never aliases: the train step donates the active states, and a host state may
    # otherwise share its buffer with `fresh` or another layer's.
    self.fresh = jax.device_put(fresh, self.host, may_alias=False)
    self.bank: dict[int, Any] = {int(l): jax.device_put(v, self.host, may_alias=False)
                                 for l, v in (bank or {}).items()}
    if preallocate:
      # Pinning host memory is slow (it would otherwise happen during the first switches of
      # every layer); allocate a host state for every inactive layer up front instead.
      source = jax.device_put(fresh, self.on_device, may_alias=False)
      for l in range(self.num_layers):
        if l not in self.bank and l not in self.slot_layers:
          self.bank[l] = jax.device_put(source, self.host, may_alias=False)
    self._prev_next = jnp.copy(s.next_active)

  def after_step(self, opt_state: Any) -> Any:
    """Call once after every optimizer step with the new state; returns the state to use next."""
    s = find_state(opt_state)
    self.step += 1
    c = self.step
    prev_next = self._prev_next
    # A copy: the train step donates the optimizer state, which would delete the original.
    self._prev_next = jnp.copy(s.next_active)
    if not self.schedule.switching(c - 1):  # the step just run was not its period's last
      return opt_state
    # The set drawn one step ago is final by now; reading it waits at most for the previous step,
    # while the step just dispatched keeps the device busy.
    incoming = [int(x) for x in np.asarray(prev_next)]
    staying = {l: j for j, l in enumerate(self.slot_layers)}
    late = not self.stream and any(l not in staying for l in incoming)
    if late:
      jax.block_until_ready(s.slot_states)  # the step just dispatched, whose temporaries the copies must not meet
    incoming_states = {l: self.bank.pop(l) if self.stream and l in self.bank else
                       jax.device_put(self.bank.pop(l, self.fresh), self.on_device, may_alias=False)
                       for l in incoming if l not in staying}
    outgoing = [l for l in self.slot_layers if l not in incoming]
    for j, l in enumerate(self.slot_layers):
      if l in outgoing:
        self.bank[l] = s.slot_states[j] if self.stream else jax.device_put(s.slot_states[j], self.host)
    if late:
      # Done before the next step is dispatched: its temporaries then meet neither the incoming copies in
      # flight nor the outgoing states still on the device.
      jax.block_until_ready((incoming_states, [self.bank[l] for l in outgoing]))
    slots = tuple(s.slot_states[staying[l]] if l in staying else incoming_states[l] for l in incoming)
    self.slot_layers = incoming
    return replace_state(opt_state, s._replace(slot_states=slots, slot_layers=prev_next))

  def checkpoint_tree(self, opt_state: Any) -> dict[str, Any]:
    """What a checkpoint must hold besides the optimizer state: every layer's state and the fresh one.

    A fixed structure (all ``L`` layers, keyed by ``str(layer)``), so a checkpoint restores into the
    tree of any other step's :meth:`checkpoint_tree`.
    """
    bank = self.full_bank(opt_state)
    return {"fresh": self.fresh, "layers": {str(l): bank[l] for l in range(self.num_layers)}}

  @staticmethod
  def checkpoint_target(opt_state: Any, host_memory_kind: str = "pinned_host") -> dict[str, Any]:
    """The structure of :meth:`checkpoint_tree`, to restore into, without allocating a host state per layer."""
    s = find_state(opt_state)
    fresh = jax.device_put(s.slot_states[0], _shardings(s.slot_states[0], host_memory_kind))
    return {"fresh": fresh, "layers": {str(l): fresh for l in range(int(s.importance.shape[0]))}}

  @classmethod
  def restore(cls, opt_state: Any, tree: dict[str, Any], *, period: int,
              host_memory_kind: str = "pinned_host", stream: bool = False) -> Offloader:
    """Rebuilds the offloader of a restored ``opt_state`` from its :meth:`checkpoint_tree`."""
    active = set(np.asarray(find_state(opt_state).active).tolist())
    bank = {int(l): v for l, v in tree["layers"].items() if int(l) not in active}
    return cls(opt_state, period=period, host_memory_kind=host_memory_kind, bank=bank, fresh=tree["fresh"],
               preallocate=False, stream=stream)

  def full_bank(self, opt_state: Any) -> dict[int, Any]:
    """Every trained layer's current state (active ones from the device), for inspection."""
    s = find_state(opt_state)
    out = dict(self.bank)
    out.update({l: s.slot_states[j] for j, l in enumerate(self.slot_layers)})
    return out
