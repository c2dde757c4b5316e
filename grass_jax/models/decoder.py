"""The decoder-only transformer shared by the Llama family and Gemma.

Llama 2/3, TinyLlama, Mistral, Qwen2 and Gemma 1/2 are one architecture with a
handful of switches (:class:`DecoderConfig`); the per-family files
(:mod:`grass_jax.models.llama`, :mod:`grass_jax.models.gemma`) turn a Hugging
Face ``config.json`` into a config and name the checkpoint tensors.

Parameters are a plain dict; the ``L`` blocks are stacked on a leading axis
under ``params['layers']`` and run with ``jax.lax.scan`` (optionally
rematerialised), so compile time and memory stay flat in depth and GRASS can
address layer ``l`` by index (``grass_jax.stacked_layers('layers')``)::

  embed            [V, D]
  layers/<name>    [L, ...]   input_norm, q_proj, k_proj, v_proj, o_proj,
                              (q_bias, k_bias, v_bias, o_bias), pre_mlp_norm,
                              gate_proj, up_proj, down_proj, (post_attn_norm,
                              post_mlp_norm for Gemma 2)
  final_norm       [D]
  lm_head          [D, V]     absent when tied to the embedding

Kernels are stored ``[in, out]``. :class:`Decoder` wraps the same parameters
as a Flax NNX module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Params = dict[str, Any]
# Per linear map name, ``(A [d_in, k], Z [d_out, k])``: the block adds ``(x A) Z^T`` to ``x W``, so that the
# gradient with respect to A is ``x^T dy Z``, a sketch of the weight gradient (grass_jax.models.slot_scan).
Probes = dict[str, tuple[jax.Array, jax.Array]]
LayerStack = Callable[[Params, jax.Array, "LayerInputs"], jax.Array]
LINEAR_MAPS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION = ("auto", "einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a decoder-only transformer (Llama family / Gemma).

  Attributes:
    model_type: the Hugging Face ``model_type`` this config came from.
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads,
    num_kv_heads, head_dim: sizes (grouped-query attention when
      ``num_kv_heads < num_heads``).
    rms_norm_eps: RMSNorm epsilon.
    norm_offset: 1.0 for Gemma's ``x * (1 + weight)`` RMSNorm, 0.0 otherwise.
    act: 'silu' (SwiGLU), 'gelu_tanh' or 'gelu' (GeGLU).
    rope_theta: RoPE base; ``rope_scaling`` holds HF's rope parameters
      (``rope_type`` 'default', 'linear' or 'llama3').
    rope_local_theta: the sliding-window layers' own RoPE base, unscaled
      (Gemma 3); None: every layer uses ``rope_theta`` and ``rope_scaling``.
    attention_bias: q/k/v projections have biases (Qwen2, or Llama's
      ``attention_bias``); ``o_bias``: the output projection has one too.
    mlp_bias: the MLP projections have biases.
    tie_word_embeddings: the LM head is the transposed embedding.
    embed_scale: multiply embeddings by sqrt(hidden_size) (Gemma).
    query_scale: attention scale (``head_dim ** -0.5`` unless the model says otherwise).
    attn_softcap, final_softcap: Gemma 2 logit soft-capping (None = off).
    sliding_window: window size for the layers flagged in ``sliding_layers``.
    sliding_layers: per layer, whether it uses the sliding window.
    post_norms: Gemma 2's extra norms after attention and after the MLP.
    qk_norm: an RMSNorm over each head's query and key before RoPE (Qwen3).
    max_position_embeddings: informational.
    hf_config: the original ``config.json`` dict, written back on export.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  norm_offset: float = 0.0
  act: str = "silu"
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  rope_local_theta: float | None = None
  attention_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  embed_scale: bool = False
  query_scale: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  sliding_window: int | None = None
  sliding_layers: tuple[bool, ...] = ()
  post_norms: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 4096
  hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.act not in ("silu", "gelu_tanh", "gelu"):
      raise ValueError(f"unsupported activation {self.act!r}")
    if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
      raise ValueError("sliding_layers must have one flag per layer")

  @property
  def scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

  def param_shapes(self) -> dict[str, Any]:
    """Shapes of every parameter (the layout in the module docstring)."""
    d, f, hd, n = self.hidden_size, self.intermediate_size, self.head_dim, self.num_layers
    q, kv = self.num_heads * hd, self.num_kv_heads * hd
    layers = {"input_norm": (n, d), "q_proj": (n, d, q), "k_proj": (n, d, kv), "v_proj": (n, d, kv),
              "o_proj": (n, q, d), "pre_mlp_norm": (n, d), "gate_proj": (n, d, f), "up_proj": (n, d, f),
              "down_proj": (n, f, d)}
    if self.attention_bias:
      layers.update(q_bias=(n, q), k_bias=(n, kv), v_bias=(n, kv))
    if self.o_bias:
      layers["o_bias"] = (n, d)
    if self.mlp_bias:
      layers.update(gate_bias=(n, f), up_bias=(n, f), down_bias=(n, d))
    if self.post_norms:
      layers.update(post_attn_norm=(n, d), post_mlp_norm=(n, d))
    if self.qk_norm:
      layers.update(q_norm=(n, hd), k_norm=(n, hd))
    shapes: dict[str, Any] = {"embed": (self.vocab_size, d), "layers": layers, "final_norm": (d,)}
    if not self.tie_word_embeddings:
      shapes["lm_head"] = (d, self.vocab_size)
    return shapes

  def num_params(self) -> int:
    return sum(math.prod(s) for s in jax.tree.leaves(self.param_shapes(), is_leaf=lambda x: isinstance(x, tuple)))


def init_params(config: DecoderConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
  """Random parameters (normal(0, 0.02) kernels; norms at identity)."""
  shapes = config.param_shapes()
  flat, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
  keys = jax.random.split(key, len(flat))
  out = []
  for path, shape, k in zip(paths, flat, keys):
    name = str(path[-1].key)
    if name.endswith("norm"):
      out.append(jnp.full(shape, 0.0 if config.norm_offset else 1.0, dtype))
    elif name.endswith("bias"):
      out.append(jnp.zeros(shape, dtype))
    else:
      out.append((0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return treedef.unflatten(out)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float) -> jax.Array:
  """RMSNorm as Hugging Face computes it (float32 statistics)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  if offset:  # Gemma: scale in float32 by (1 + w), then cast
    return (y * (offset + weight.astype(jnp.float32))).astype(x.dtype)
  return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
  """Inverse frequencies ``[head_dim / 2]`` including 'linear' and 'llama3' scaling; with
  ``rope_local_theta``, ``[2, head_dim / 2]``: the global layers' row, then the sliding-window layers'."""
  if config.rope_local_theta is not None:
    local = dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=(), rope_local_theta=None)
    return np.stack([rope_inv_freq(dataclasses.replace(config, rope_local_theta=None)), rope_inv_freq(local)])
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
  rope = dict(config.rope_scaling)
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / rope["factor"]
  if kind == "llama3":
    factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise NotImplementedError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF's rotate-half convention. x: [B, T, H, hd]; positions: [B, T]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
  sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class KVCache(NamedTuple):
  """Key/value cache for generation.

  Attributes:
    k, v: ``[L, B, S, Hkv, hd]``.
    mask: ``[B, S]`` valid keys, including the tokens a call adds.
    index: where the tokens of the next :func:`forward` call go (int scalar).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  index: jax.Array | int = 0


class LayerCache(NamedTuple):
  """One layer's slice of a :class:`KVCache`: ``k, v [B, S, Hkv, hd]`` and where the new tokens go."""

  k: jax.Array
  v: jax.Array
  index: jax.Array | int


def init_cache(config: DecoderConfig, batch: int, length: int, dtype: Any = jnp.bfloat16) -> KVCache:
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool))


def _attention_mask(config: DecoderConfig, q_pos: jax.Array, k_pos: jax.Array, k_valid: jax.Array,
                    sliding: jax.Array, q_seg: jax.Array | None = None) -> jax.Array:
  """Boolean ``[B, 1, 1, T, S]`` mask: causal, padding, (per layer) sliding window, and with ``q_seg`` (the
  queries' segment ids; ``k_valid`` then holds the keys') no attention across packed sequences."""
  causal = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
  mask = causal & (k_valid[:, None, :] != 0)
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == k_valid[:, None, :])
  if config.sliding_window is not None:
    in_window = (q_pos[:, :, None] - k_pos[:, None, :]) < config.sliding_window
    mask = mask & (in_window | ~sliding)
  return mask[:, None, None]


def segment_positions(segments: jax.Array) -> jax.Array:
  """Each token's position in its sequence ``[B, T]`` (0 for padding), from a mask of segment ids (0: padding):
  a run of equal ids is one sequence, so a 0/1 padding mask gives one sequence per row."""
  t = jnp.arange(segments.shape[1])
  starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
  return jnp.where(segments != 0, t - first, 0).astype(jnp.int32)


def _linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
            probe: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  y = x @ kernel.astype(x.dtype)
  if probe is not None:
    a, z = probe
    y = y + (x @ a.astype(x.dtype)) @ z.astype(x.dtype).T
  return y if bias is None else y + bias.astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else jnp.tanh(x / cap) * cap


def resolve_attention(config: DecoderConfig, attention: str, dtype: Any, *, decoding: bool = False) -> str:
  """The attention implementation ``attention='auto'`` stands for.

  'cudnn' on GPU for bf16/fp16 training passes of models without logit soft-capping and with
  ``head_dim <= 128`` (faster than 'einsum' wherever measured), else 'einsum'.
  Other values pass through unchanged.
  """
  if attention not in ATTENTION:
    raise ValueError(f"attention={attention!r}; choose one of {', '.join(ATTENTION)}")
  if attention != "auto":
    return attention
  fused_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and config.attn_softcap is None and config.head_dim <= 128 and not decoding)
  return "cudnn" if fused_ok else "einsum"


def _attention(config: DecoderConfig, q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
               impl: str, act_sharding: Any = None) -> jax.Array:
  """Grouped-query attention ``[B, T, H, hd]`` over ``[B, S, Hkv, hd]`` keys; mask ``[B, 1, 1, T, S]``."""
  b, t = q.shape[:2]
  if impl != "einsum":
    if config.attn_softcap is not None:
      raise ValueError(f"attention={impl!r} has no logit soft-capping ({config.model_type}); use 'einsum'")
    if act_sharding is not None:
      # cuDNN's partitioner needs q, k and v sharded alike; with FSDP-split projection weights XLA
      # would otherwise split q and k/v differently (e.g. over heads), and compilation fails.
      q, keys, values = (jax.lax.with_sharding_constraint(x, act_sharding) for x in (q, keys, values))
    out = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, :, 0], scale=config.scale, implementation=impl)
    return out.reshape(b, t, config.num_heads * config.head_dim)
  groups = config.num_heads // config.num_kv_heads
  qg = q.reshape(b, t, config.num_kv_heads, groups, config.head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32) * config.scale
  scores = _softcap(scores, config.attn_softcap)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, values).reshape(b, t, config.num_heads * config.head_dim)


class LayerInputs(NamedTuple):
  """What every block reads besides its weights and hidden state (no gradient flows to these).

  This is the interface between :func:`forward` and a ``layer_stack`` that replaces its layer scan
  (:mod:`grass_jax.models.slot_scan`): positions ``[B, T]``, RoPE ``inv_freq``, ``sliding`` (bool
  ``[L]``: the layer uses the sliding window) and ``k_valid`` (``[B, T]``: each token's segment id, 0 for
  padding; a batch that packs no sequences has 1 for every real token).
  """
  positions: jax.Array
  inv_freq: jax.Array
  sliding: jax.Array
  k_valid: jax.Array


def block(config: DecoderConfig, lp: Params, h: jax.Array, inputs: LayerInputs, cache: LayerCache | None = None,
          *, attention: str = "einsum", act_sharding: Any = None,
          probes: Probes | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """One transformer block. Returns the new hidden state and this layer's ``(k, v)`` (the cache's, updated).

  ``inputs``: this layer's :class:`LayerInputs` (``sliding`` a scalar). ``cache``: this layer's slice of
  the cache when decoding. ``act_sharding``: sharding of ``[B, T, H, hd]`` activations on a mesh (batch
  split), applied to q, k and v before a fused attention kernel; None on one device. ``probes``: sketch
  probes of the linear maps (see :data:`Probes`); with zero ``A`` the output is unchanged.
  """
  pr = probes or {}
  b, t, _ = h.shape
  eps, off = config.rms_norm_eps, config.norm_offset
  x = rms_norm(h, lp["input_norm"], eps, off)
  q = _linear(x, lp["q_proj"], lp.get("q_bias"), pr.get("q_proj")).reshape(b, t, config.num_heads, config.head_dim)
  k = _linear(x, lp["k_proj"], lp.get("k_bias"), pr.get("k_proj")).reshape(b, t, config.num_kv_heads, config.head_dim)
  v = _linear(x, lp["v_proj"], lp.get("v_bias"), pr.get("v_proj")).reshape(b, t, config.num_kv_heads, config.head_dim)
  if config.qk_norm:
    q, k = rms_norm(q, lp["q_norm"], eps, off), rms_norm(k, lp["k_norm"], eps, off)
  positions, inv_freq, sliding, k_valid = inputs
  if inv_freq.ndim == 2:  # global and sliding-window layers rotate at their own frequencies (Gemma 3)
    inv_freq = jnp.where(sliding, inv_freq[1], inv_freq[0])
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq)
  if cache is None:
    keys, values = k, v
    q_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    k_pos = q_pos
  else:
    ck, cv, cache_index = cache
    keys = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1).astype(h.dtype)
    values = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1).astype(h.dtype)
    q_pos = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
    k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
  mask = _attention_mask(config, q_pos, k_pos, k_valid, sliding, q_seg=k_valid if cache is None else None)
  attn = _attention(config, q, keys, values, mask, attention, act_sharding)
  out = _linear(attn, lp["o_proj"], lp.get("o_bias"), pr.get("o_proj"))
  if config.post_norms:
    out = rms_norm(out, lp["post_attn_norm"], eps, off)
  h = h + out
  x = rms_norm(h, lp["pre_mlp_norm"], eps, off)
  gate = _linear(x, lp["gate_proj"], lp.get("gate_bias"), pr.get("gate_proj"))
  if config.act == "silu":
    act = jax.nn.silu(gate)
  else:
    act = jax.nn.gelu(gate, approximate=config.act == "gelu_tanh")
  out = _linear(act * _linear(x, lp["up_proj"], lp.get("up_bias"), pr.get("up_proj")), lp["down_proj"],
                lp.get("down_bias"), pr.get("down_proj"))
  if config.post_norms:
    out = rms_norm(out, lp["post_mlp_norm"], eps, off)
  return h + out, ((k, v) if cache is None else (keys, values))


def with_remat(fn: Callable, policy: str) -> Callable:
  """``fn`` under a rematerialisation policy: 'none', 'full' (keep inputs only) or 'dots' (matmul outputs)."""
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  if policy == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)
  raise ValueError(f"remat must be one of {REMAT_POLICIES}; got {policy!r}")


def run_block(config: DecoderConfig, lp: Params, h: jax.Array, idx: jax.Array, inputs: LayerInputs, *,
              attention: str, act_sharding: Any = None, probes: Probes | None = None) -> jax.Array:
  """Block ``idx`` (weights ``lp``) on ``h`` without a cache: what a ``layer_stack`` runs per layer."""
  return block(config, lp, h, inputs._replace(sliding=inputs.sliding[idx]), attention=attention,
               act_sharding=act_sharding, probes=probes)[0]


@dataclasses.dataclass(frozen=True)
class ForwardOptions:
  """How :func:`forward` computes (never what): the same options give the same function of the weights.

  Attributes:
    dtype: compute dtype (bf16 for training; params are cast on use).
    remat: 'none', 'full' or 'dots' rematerialisation of each block.
    attention: 'auto' (default: 'cudnn' where it applies, see :func:`resolve_attention`, else 'einsum'),
      'einsum' (explicit scores; any model) or an implementation of ``jax.nn.dot_product_attention``:
      'xla', or 'cudnn' (fused, GPU, bf16). Those two have no soft-capping (Gemma 2).
    act_sharding: on a mesh, the sharding of ``[B, T, H, hd]`` activations
      (:func:`grass_jax.sharding.activation_sharding`); q, k and v are constrained to it before a fused
      attention kernel, which needs them sharded alike. None (default) on one device.

  Example::

    >>> ForwardOptions(remat="full").attention
    'auto'
  """

  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"
  act_sharding: Any = None

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}; got {self.remat!r}")
    if self.attention not in ATTENTION:
      raise ValueError(f"attention must be one of {ATTENTION}; got {self.attention!r}")


def scan_stack(config: DecoderConfig, options: ForwardOptions = ForwardOptions()) -> LayerStack:
  """The model's own layer scan as a ``layer_stack``."""
  attention = resolve_attention(config, options.attention, options.dtype)

  def run(layers: Params, h: jax.Array, inputs: LayerInputs) -> jax.Array:
    def body(h, xs):
      lp, idx = xs
      return run_block(config, lp, h, idx, inputs, attention=attention, act_sharding=options.act_sharding), None

    return jax.lax.scan(with_remat(body, options.remat), h, (layers, jnp.arange(config.num_layers)))[0]

  return run


def hidden_states(params: Params, config: DecoderConfig, tokens: jax.Array, attention_mask: jax.Array | None = None,
                  *, positions: jax.Array | None = None, cache: KVCache | None = None,
                  options: ForwardOptions = ForwardOptions(), layer_stack: LayerStack | None = None
                  ) -> tuple[jax.Array, KVCache | None]:
  """The final normed hidden states ``[B, T, D]`` (for a chunked loss) and the updated cache or None.

  Arguments as :func:`forward`.
  """
  options = dataclasses.replace(options, attention=resolve_attention(config, options.attention, options.dtype,
                                                                      decoding=cache is not None))
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  if positions is None:
    positions = segment_positions(attention_mask)
  h = jnp.take(params["embed"], tokens, axis=0).astype(options.dtype)
  if config.embed_scale:
    h = h * jnp.asarray(config.hidden_size ** 0.5, options.dtype)
  inv_freq = jnp.asarray(rope_inv_freq(config))
  sliding = jnp.asarray(config.sliding_layers or (config.sliding_window is not None,) * config.num_layers)
  inputs = LayerInputs(positions, inv_freq, sliding, attention_mask if cache is None else cache.mask)

  if cache is None:
    h = (layer_stack or scan_stack(config, options))(params["layers"], h, inputs)
  else:
    if layer_stack is not None:
      raise ValueError("a layer_stack (training a subset of layers) cannot be combined with a KV cache")

    def body(h, xs):
      lp, slide, k, v = xs
      return block(config, lp, h, inputs._replace(sliding=slide), LayerCache(k, v, cache.index),
                   attention=options.attention, act_sharding=options.act_sharding)

    h, (new_k, new_v) = jax.lax.scan(with_remat(body, options.remat), h, (params["layers"], sliding, cache.k, cache.v))
    cache = cache._replace(k=new_k.astype(cache.k.dtype), v=new_v.astype(cache.v.dtype))
  return rms_norm(h, params["final_norm"], config.rms_norm_eps, config.norm_offset), cache


def forward(params: Params, config: DecoderConfig, tokens: jax.Array, attention_mask: jax.Array | None = None,
            *, positions: jax.Array | None = None, cache: KVCache | None = None,
            options: ForwardOptions = ForwardOptions(), layer_stack: LayerStack | None = None
            ) -> tuple[jax.Array, KVCache | None]:
  """Runs the model. Returns ``(logits [B, T, V] float32, updated cache or None)``.

  Args:
    params: parameters in the layout of the module docstring.
    tokens: int ``[B, T]``.
    attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (left or right); or, for a row packing
      several sequences, each token's sequence number (1, 2, ...): positions restart at each sequence
      and no token attends to another sequence.
      Without a cache, positions default to ``cumsum(mask) - 1``.
    positions: int ``[B, T]`` RoPE positions, overriding the default.
    cache: a :class:`KVCache` to read and extend at ``cache.index`` (generation); ``cache.mask``
      must already mark the valid keys including the new tokens.
    options: how it computes (:class:`ForwardOptions`: dtype, remat, attention, activation sharding).
    layer_stack: ``(layers, h, inputs) -> h`` run instead of the layer scan, with
      ``layers = params['layers']`` and a :class:`LayerInputs`; e.g.
      :func:`grass_jax.models.slot_scan.slot_stack`, which trains a few layers. Not with a cache.

  Example::

    >>> cfg = DecoderConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                     num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    >>> logits, _ = forward(init_params(cfg, jax.random.key(0)), cfg, jnp.ones((1, 4), jnp.int32),
    ...                     options=ForwardOptions(remat="full"))
    >>> logits.shape
    (1, 4, 32)
  """
  h, cache = hidden_states(params, config, tokens, attention_mask, positions=positions, cache=cache, options=options,
                           layer_stack=layer_stack)
  return logits_from_hidden(params, config, h), cache


def logits_from_hidden(params: Params, config: DecoderConfig, h: jax.Array) -> jax.Array:
  """LM head (tied or not) and final soft-capping, in float32."""
  head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  return _softcap(_head_logits(h, head), config.final_softcap)


@jax.custom_vjp
def _head_logits(h: jax.Array, head: jax.Array) -> jax.Array:
  """``h @ head`` as float32 logits, multiplied in ``h``'s dtype.

  Autodiff would multiply the float32 logits' gradient by the head in float32: XLA converts the
  whole ``[D, V]`` head to float32 first (Llama-2-7B: a 500 MiB temporary and a float32 matmul). The backward pass here rounds that gradient to ``h``'s dtype
  and multiplies with float32 accumulation, as :mod:`grass_jax.loss`'s chunked loss does.
  """
  return jnp.einsum("btd,dv->btv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def _head_logits_fwd(h, head):
  return _head_logits(h, head), (h, head)


def _head_logits_bwd(res, g):
  h, head = res
  g = g.astype(h.dtype)
  dh = jnp.einsum("btv,dv->btd", g, head.astype(h.dtype), preferred_element_type=jnp.float32)
  dhead = jnp.einsum("btd,btv->dv", h, g, preferred_element_type=jnp.float32)
  return dh.astype(h.dtype), dhead.astype(head.dtype)


_head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


class Decoder(nnx.Module):
  """Flax NNX module over the same parameters; ``model(tokens, mask)`` gives logits.

  ``nnx.state(model, nnx.Param).to_pure_dict()`` is the plain ``params`` dict
  used by :func:`forward` and by GRASS (layers stacked under ``'layers'``).
  """

  def __init__(self, config: DecoderConfig, params: Params | None = None, *, rngs: nnx.Rngs | None = None,
               param_dtype: Any = jnp.float32, dtype: Any = jnp.float32, remat: str = "none"):
    self.config = config
    self.dtype = dtype
    self.remat = remat
    if params is None:
      key = (rngs or nnx.Rngs(0)).params()
      params = init_params(config, key, param_dtype)
    self.embed = nnx.Param(params["embed"])
    self.layers = nnx.data({k: nnx.Param(v) for k, v in params["layers"].items()})
    self.final_norm = nnx.Param(params["final_norm"])
    self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None

  def params(self) -> Params:
    """The plain parameter dict (arrays are shared, not copied)."""
    out = {"embed": self.embed[...], "layers": {k: v[...] for k, v in self.layers.items()},
           "final_norm": self.final_norm[...]}
    if self.lm_head is not None:
      out["lm_head"] = self.lm_head[...]
    return out

  def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None, **kwargs) -> jax.Array:
    """Logits; ``kwargs`` are :class:`ForwardOptions` fields besides the module's dtype and remat."""
    options = ForwardOptions(dtype=self.dtype, remat=self.remat, **kwargs)
    logits, _ = forward(self.params(), self.config, tokens, attention_mask, options=options)
    return logits
