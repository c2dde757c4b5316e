"""Probe: cost of device->pinned_host copies, fresh allocation vs donated reuse, and whether they block Python."""
import time
import jax, jax.numpy as jnp

dev = jax.devices()[0]
host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
ondev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
n = 150 * 2**20 // 2  # 150 MiB of bf16
x = jnp.ones((n,), jnp.bfloat16)
jax.block_until_ready(x)

def timeit(fn, reps=5):
  fn(); ts = []
  for _ in range(reps):
    t = time.perf_counter(); r = fn(); jax.block_until_ready(r); ts.append(time.perf_counter() - t)
  return min(ts) * 1e3

print("device_put D2H fresh  ms", timeit(lambda: jax.device_put(x, host)))
h = jax.device_put(x, host); jax.block_until_ready(h)
print("device_put H2D fresh  ms", timeit(lambda: jax.device_put(h, ondev)))
copy_to_host = jax.jit(lambda dst, src: src, donate_argnums=0, out_shardings=host)
buf = [jax.device_put(x, host)]
def reuse():
  buf[0] = copy_to_host(buf[0], x); return buf[0]
try:
  print("jit D2H donated reuse ms", timeit(reuse))
except Exception as e:
  print("jit D2H donated reuse failed:", type(e).__name__, str(e)[:200])
to_host_jit = jax.jit(lambda src: src, out_shardings=host)
print("jit D2H no donation  ms", timeit(lambda: to_host_jit(x)))

# Does issuing a D2H block Python while a long computation is pending?
a = jnp.ones((8192, 8192), jnp.bfloat16)
mm = jax.jit(lambda a: (a @ a @ a @ a @ a @ a @ a @ a).sum())
jax.block_until_ready(mm(a))
t = time.perf_counter(); r = mm(a); jax.block_until_ready(r); comp = time.perf_counter() - t
y = x * 2; jax.block_until_ready(y)
t = time.perf_counter(); r = mm(a); t1 = time.perf_counter(); z = jax.device_put(y, host); t2 = time.perf_counter()
jax.block_until_ready((r, z)); t3 = time.perf_counter()
print(f"compute alone {comp*1e3:.1f} ms; with D2H issued: dispatch {1e3*(t1-t):.2f} ms, device_put returned after {1e3*(t2-t1):.2f} ms, all done {1e3*(t3-t):.1f} ms")
t = time.perf_counter(); r = mm(a); t1 = time.perf_counter(); z = jax.device_put(h, ondev); t2 = time.perf_counter()
jax.block_until_ready((r, z)); t3 = time.perf_counter()
print(f"with H2D issued: device_put returned after {1e3*(t2-t1):.2f} ms, all done {1e3*(t3-t):.1f} ms")
# dependent D2H: source produced by the pending computation
t = time.perf_counter(); w = jax.jit(lambda a, x: x + (a @ a @ a @ a @ a @ a @ a @ a).sum().astype(x.dtype))(a, x); t1 = time.perf_counter()
z = jax.device_put(w, host); t2 = time.perf_counter(); jax.block_until_ready(z); t3 = time.perf_counter()
print(f"dependent D2H: device_put returned after {1e3*(t2-t1):.2f} ms, all done {1e3*(t3-t):.1f} ms")
