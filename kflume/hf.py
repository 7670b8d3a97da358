"""kflume.patch(model, cluster): Hugging Face decoder models with their core attention on
attention nodes, through transformers' public extension points only.

- `AttentionInterface.register("kflume", ...)`: the attention function. Models that use
  the attention-function interface (Llama, Mistral, Qwen2, Qwen3, ...) call it after
  RoPE with q, and with whatever their cache's `update()` returned as k, v.
- `AttentionMaskInterface.register("kflume", ...)`: the mask the model builds is the 2D
  padding mask (True = real token); causality is applied here, by position.
- `KflumeCache`, a `Cache` subclass: its `update()` keeps nothing locally and returns the
  new k, v; it carries the generation's session (one request per batch row).
- `model.generate` is wrapped on the instance so that a generation without a cache gets a
  `KflumeCache`; `kflume.unpatch(model)` restores the attention implementation and
  removes the wrapper. Model files are untouched.

One generation is one session: its prefill adds a request per row to the cluster's router
and scatters the prompt's KV to the nodes; each decode step is one token boundary
(`Cluster.begin_step`). Limits (raised as errors, never silently wrong): beam search and
other cache reordering, a multi-token forward on top of a history (chunked prefill,
assisted decoding), and sliding-window layers past their window.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import weakref

import torch
import torch.nn.functional as F

from .weight.cluster import Cluster

__all__ = ["patch", "unpatch", "KflumeCache"]

NAME = "kflume"
_PENDING: contextvars.ContextVar = contextvars.ContextVar("kflume_pending", default=None)
_session_ids = itertools.count()


def _hf():
    try:
        import transformers
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.cache_utils import Cache, CacheLayerMixin
    except ImportError as e:  # pragma: no cover
        raise ImportError("kflume.patch needs transformers: pip install 'kflume[hf]'") from e
    return transformers, AttentionInterface, AttentionMaskInterface, Cache, CacheLayerMixin


class _Session:
    """One generation on a cluster: the request of each batch row, and step bookkeeping."""

    def __init__(self, cluster: Cluster, num_layers: int):
        self.cluster, self.num_layers = cluster, num_layers
        self.id = next(_session_ids)
        self.requests: list[str] = []
        self.decoding = False  # a decode step ran: its tokens are confirmed at the next one
        self.closed = False

    def prefill(self, lengths: list[int]) -> None:
        if self.requests:
            raise NotImplementedError(
                "kflume: a multi-token forward on top of a history (chunked prefill, assisted "
                "decoding, a continued conversation) is not supported; start a new generation")
        self.requests = [f"s{self.id}-r{b}" for b in range(len(lengths))]
        for rid, n in zip(self.requests, lengths):
            self.cluster.router.add_request(rid, n)
        self._boundary()

    def decode_step(self) -> None:
        if not self.requests:
            raise RuntimeError("kflume: decode step before the prompt was prefilled")
        if self.decoding:
            for rid in self.requests:
                self.cluster.router.advance(rid)
        self._boundary()
        self.decoding = True

    def _boundary(self) -> None:
        self.cluster.end_step()  # raise any refusal of the last step's appends
        plan = self.cluster.begin_step()
        if list(plan.requests) != self.requests:
            raise RuntimeError(
                "kflume: the cluster routes requests of another generation; run one "
                "generation per cluster at a time (or close the other's KflumeCache)")

    def close(self) -> None:
        """Free the session's KV on the nodes (at a boundary of its own)."""
        if self.closed or not self.requests:
            self.closed = True
            return
        self.closed = True
        self.cluster.end_step(wait=True)
        for rid in self.requests:
            self.cluster.router.finish_request(rid)
        self.cluster.begin_step()


def _make_cache_classes():
    _, _, _, Cache, CacheLayerMixin = _hf()

    class KflumeLayer(CacheLayerMixin):
        """Keeps no KV: counts tokens (HF's notion of cache length) and returns the new k, v."""

        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self):
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states, value_states=None):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.length += key_states.shape[-2]
            return key_states, value_states

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length) -> tuple[int, int]:
            if torch.is_tensor(query_length):  # transformers 4.5x passed cache_position
                query_length = query_length.shape[0]
            return self.length + query_length, 0

        def get_max_length(self) -> int:
            return -1

        get_max_cache_shape = get_max_length

        def offload(self):
            pass

        def prefetch(self):
            pass

        def reset(self):
            raise NotImplementedError("kflume: a KflumeCache cannot be reset; make a new one")

        def crop(self, *args):
            raise NotImplementedError("kflume: cropping the KV (assisted decoding) is not "
                                      "supported")

        def reorder_cache(self, beam_idx):
            raise NotImplementedError("kflume: beam search (cache reordering) is not supported")

        def batch_repeat_interleave(self, repeats):
            raise NotImplementedError("kflume: repeating cache rows is not supported")

        def batch_select_indices(self, indices):
            raise NotImplementedError("kflume: selecting cache rows is not supported")

    class KflumeCache(Cache):
        """A cache whose KV lives on the attention nodes of `cluster`.

        Pass it to `generate(past_key_values=...)` to keep it after the call; `close()`
        (or garbage collection) frees its KV on the nodes.
        """

        def __init__(self, cluster: Cluster, config):
            cfg = config.get_text_config(decoder=True)
            super().__init__(layers=[KflumeLayer() for _ in range(cfg.num_hidden_layers)])
            self.session = _Session(cluster, cfg.num_hidden_layers)
            self._finalizer = weakref.finalize(self, self.session.close)

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            _PENDING.set((self, layer_idx, k))  # for the attention function, called next
            return k, v

        def close(self) -> None:
            self._finalizer()

    return KflumeCache


@functools.cache
def _cache_class():
    return _make_cache_classes()


def KflumeCache(cluster: Cluster, config):  # noqa: N802 - a class, built lazily (optional HF)
    """A transformers Cache whose KV lives on the cluster's attention nodes."""
    return _cache_class()(cluster, config)


# ---- the mask and attention functions --------------------------------------------------------
def kflume_padding_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                        attention_mask=None, **kwargs):
    """2D bool `[B, kv_length]` (True = real token), or None when nothing is padding."""
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    if m.shape[-1] < kv_offset + kv_length:
        m = F.pad(m, (0, kv_offset + kv_length - m.shape[-1]), value=False)
    m = m[:, kv_offset : kv_offset + kv_length]
    return None if bool(m.all()) else m


def _causal_local(query, key, value, valid, scaling, window):
    """Attention of S queries over S keys, causal in position among real tokens; `valid`
    [B, S] or None. Returns [B, S, Hq, D]."""
    b, hq, s, _ = query.shape
    pos = torch.arange(s, device=query.device)
    allowed = pos[None, :] <= pos[:, None]  # [S, S]
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None, None].expand(b, 1, s, s)
    if valid is not None:  # left padding: real tokens are contiguous, slots == positions
        allowed = allowed & valid[:, None, None, :]
        allowed = allowed | torch.eye(s, dtype=torch.bool, device=query.device)  # pads: self
    g = hq // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1),
                                         value.repeat_interleave(g, 1), attn_mask=allowed,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()


def kflume_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    """The attention function registered as "kflume" (transformers' interface).

    query `[B, Hq, S, D]` after RoPE; key, value `[B, Hkv, S, D]`, the new tokens only when
    they come from a KflumeCache. Returns `(out [B, S, Hq, D], None)`.
    """
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("kflume expects the 2D padding mask of kflume_padding_mask; this model "
                         "builds another mask")
    window = kwargs.get("sliding_window")
    pending = _PENDING.get()
    if pending is None or pending[2] is not key or pending[1] != module.layer_idx:
        # k, v came from another cache (or none): attend locally over what was given.
        valid = attention_mask
        s, t = query.shape[2], key.shape[2]
        if s != t:
            return _local_with_history(query, key, value, valid, scaling, window), None
        return _causal_local(query, key, value, valid, scaling, window), None
    _PENDING.set(None)
    cache, layer, _ = pending
    session: _Session = cache.session
    b, hq, s, d = query.shape
    valid = None if attention_mask is None else attention_mask[:, -s:]
    history = cache.layers[layer].length - s
    if window is not None and history + s > window:
        raise NotImplementedError(f"kflume: sliding-window layer {layer} past its window of "
                                  f"{window} tokens is not supported")
    remote = session.cluster.attention(num_q_heads=hq, scale=scaling, device=query.device)
    if scaling is not None and abs(remote.scale - scaling) > 1e-12:
        raise ValueError(f"kflume: layer {layer} uses scale {scaling}, the cluster {remote.scale}")
    if s > 1 or history == 0:  # a prompt: attend locally, scatter its KV to the nodes
        if layer == 0:
            session.prefill([s] * b if valid is None else valid.sum(1).tolist())
        out = _causal_local(query, key, value, valid, scaling, window)
        for i, rid in enumerate(session.requests):
            idx = slice(None) if valid is None else valid[i].nonzero().squeeze(-1)
            remote.prefill(layer, rid, key[i][:, idx].transpose(0, 1).contiguous(),
                           value[i][:, idx].transpose(0, 1).contiguous())
        return out, None
    if valid is not None and not bool(valid.all()):
        raise ValueError("kflume: a decode token marked as padding")
    if layer == 0:
        session.decode_step()
    out = remote(layer, query[:, :, 0], key[:, :, 0].contiguous(), value[:, :, 0].contiguous())
    return out.unsqueeze(1), None


def _local_with_history(query, key, value, valid, scaling, window):
    """Fallback for a local cache: S queries over T >= S keys (the last S are the queries')."""
    s, t = query.shape[2], key.shape[2]
    qpos = torch.arange(t - s, t, device=query.device)
    kpos = torch.arange(t, device=query.device)
    allowed = kpos[None, :] <= qpos[:, None]
    if window is not None:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - window)
    allowed = allowed[None, None]
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
    g = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(g, 1),
                                         value.repeat_interleave(g, 1), attn_mask=allowed,
                                         scale=scaling)
    return out.transpose(1, 2).contiguous()


# ---- patch / unpatch ---------------------------------------------------------------------------
def _register() -> None:
    _, AttentionInterface, AttentionMaskInterface, _, _ = _hf()
    AttentionInterface.register(NAME, kflume_attention)
    AttentionMaskInterface.register(NAME, kflume_padding_mask)


def patch(model, cluster: Cluster):
    """Route `model`'s core attention to `cluster`'s attention nodes; returns the model.

    The model's KV geometry must match the cluster's (layers, KV heads, head size, dtype).
    After this, `model.generate(...)` keeps its KV on the nodes; `kflume.unpatch(model)`
    undoes it.
    """
    if getattr(model, "_kflume", None) is not None:
        raise ValueError("model is already patched; unpatch it first")
    cfg = model.config.get_text_config(decoder=True)
    g = cluster.geometry
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    for what, have, want in (("layers", cfg.num_hidden_layers, g.layers),
                             ("KV heads", kv_heads, g.kv_heads),
                             ("head size", head_dim, g.head_dim), ("dtype", dtype, g.dtype)):
        if have != want:
            raise ValueError(f"model has {what} {have!r} but the cluster's nodes hold {want!r}")
    _register()
    original = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(f"{type(model).__name__} does not use transformers' attention-function "
                         "interface, so kflume cannot plug into it")
    inner = model.generate

    @functools.wraps(inner)
    def generate(*args, **kwargs):
        own = kwargs.get("past_key_values") is None and kwargs.get("use_cache", True)
        if own:
            kwargs["past_key_values"] = KflumeCache(cluster, model.config)
        try:
            return inner(*args, **kwargs)
        finally:
            if own:
                kwargs["past_key_values"].close()

    model.generate = generate
    model._kflume = (original, cluster)
    return model


def unpatch(model):
    """Undo `patch`: the original attention implementation, and no generate wrapper."""
    state = getattr(model, "_kflume", None)
    if state is None:
        raise ValueError("model is not patched by kflume")
    model.set_attn_implementation(state[0])
    model.__dict__.pop("generate", None)
    del model._kflume
    return model
