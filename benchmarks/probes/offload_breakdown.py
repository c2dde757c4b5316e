"""Probe: where does the K=1 offload overhead go? Step time with parts of the swap disabled."""
import sys, time
sys.path.insert(0, ".")
import jax, jax.numpy as jnp, numpy as np, optax
import grass_jax
from grass_jax.models import config_from_hf, init_params
from grass_jax.offload import Offloader
from grass_jax.transform import find_state, replace_state
from grass_jax.train import LAYERS, make_train_step
from benchmarks.common import SIZES

size = sys.argv[1] if len(sys.argv) > 1 else "tinyllama-1.1b"
cfg = config_from_hf(SIZES[size])
dev = jax.devices()[0]
params = jax.device_put(jax.jit(lambda k: init_params(cfg, k, jnp.bfloat16))(jax.random.PRNGKey(0)), dev)
tx = grass_jax.transform(optax.adamw(1e-5), layers=LAYERS, num_active=2, period=1, offload=True)
opt = jax.device_put(jax.jit(tx.init)(params), dev)
step = make_train_step(cfg, tx)
tok = jnp.ones((1, 16, 512), jnp.int32)
batch = dict(tokens=tok, attention_mask=tok, loss_mask=tok)


class Variant(Offloader):
  def __init__(self, st, mode):
    super().__init__(st, period=1)
    self.mode = mode
    self.t_host = 0.0

  def after_step(self, opt_state):
    t = time.perf_counter()
    if self.mode == "full":
      out = super().after_step(opt_state)
    else:
      s = find_state(opt_state)
      self.step += 1
      prev = self._prev_next
      self._prev_next = jnp.copy(s.next_active)
      incoming = [int(x) for x in np.asarray(prev)] if self.mode != "noread" else self.slot_layers
      if self.mode == "d2h_only":
        for j in range(len(self.slot_layers)):
          self.bank[self.slot_layers[j]] = jax.device_put(s.slot_states[j], self.host)
      if self.mode == "h2d_only":
        slots = tuple(jax.device_put(self.fresh, self.on_device) for _ in incoming)
        s = s._replace(slot_states=slots)
      self.slot_layers = incoming
      out = replace_state(opt_state, s._replace(slot_layers=prev))
    self.t_host += time.perf_counter() - t
    return out


for mode in ["noread", "readonly", "d2h_only", "h2d_only", "full"]:
  off = Variant(opt, mode)
  for i in range(3):
    params, opt, m = step(params, opt, batch); opt = off.after_step(opt)
  jax.block_until_ready(m); off.t_host = 0.0
  t = time.perf_counter()
  n = 30
  for i in range(n):
    params, opt, m = step(params, opt, batch); opt = off.after_step(opt)
  jax.block_until_ready(m)
  print(f"{mode:<10} step {1e3 * (time.perf_counter() - t) / n:.1f} ms, host time in after_step {1e3 * off.t_host / n:.1f} ms, compiles {step._cache_size()}", flush=True)
  # reset the state to a consistent one for the next variant
  opt = jax.device_put(jax.jit(tx.init)(params), dev)
