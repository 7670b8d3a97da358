"""KflumeCache: a transformers `Cache` whose KV lives on attention nodes.

Its layers keep no KV: they count tokens (what transformers calls the cache's length)
and hand the new k, v to the attention function, through `PENDING`, which kflume's
attention function reads right after (kflume/hf/attention.py). The cache carries the
generation's `Session` (kflume/hf/session.py): one request per batch row on the cluster.
transformers is imported on first use (the `hf` extra).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref

import torch

__all__ = ["FORWARD", "KflumeCache", "PENDING", "cache_keyword", "hf", "restore_cache"]

# (cache, layer index, the k the cache returned): set by the cache's update(), read by
# the attention function of the same layer.
PENDING: contextvars.ContextVar = contextvars.ContextVar("kflume_pending", default=None)
# The KflumeCaches of the patched model's forwards running (nested: a recomputation),
# kept by kflume/hf/patch.py's forward hooks; empty: a forward with another cache.
FORWARD: contextvars.ContextVar = contextvars.ContextVar("kflume_forward", default=())


def hf():
    try:
        import transformers
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.cache_utils import Cache, CacheLayerMixin
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("kflume.patch needs transformers: pip install 'kflume[hf]'") from e
    return transformers, AttentionInterface, AttentionMaskInterface, Cache, CacheLayerMixin


class Unsupported(NotImplementedError, AttributeError):
    """A cache feature a model asks of a KflumeCache that kflume does not implement (an
    AttributeError too, so that `hasattr` probes of transformers read it as absent)."""


_STATE_APIS = ("get_conv_state", "update_conv_state", "get_recurrent_state",
               "update_recurrent_state", "update_indexer")


@functools.cache
def _classes():
    _, _, _, Cache, CacheLayerMixin = hf()

    class KflumeLayer(CacheLayerMixin):
        """Keeps no KV: counts tokens and returns the new k, v."""

        def __getattr__(self, name: str):
            if name.startswith("__") or name in ("length", "dtype", "device", "model"):
                raise AttributeError(name)
            raise Unsupported(f"kflume: {self.model} uses {name!r} of its cache layers, a kind "
                              "of cache kflume does not implement (it holds attention KV only)")

        is_sliding = False
        is_compileable = False
        is_croppable = True  # KflumeCache.crop truncates the requests on the nodes

        def __init__(self, length: int = 0, model: str = "the model"):
            super().__init__()
            self.length, self.model = length, model

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

        def crop(self, tokens):
            raise RuntimeError("kflume: crop a KflumeCache, not one of its layers")

        def reorder_cache(self, beam_idx):
            raise NotImplementedError("kflume: beam search (cache reordering) is not supported")

        def batch_repeat_interleave(self, repeats):
            raise NotImplementedError("kflume: repeating cache rows is not supported")

        def batch_select_indices(self, indices):
            raise NotImplementedError("kflume: selecting cache rows is not supported")

    class KflumeCache(Cache):
        """A cache whose KV lives on the attention nodes of `cluster`.

        Pass it to `generate(past_key_values=...)` to keep it after the call: its KV stays
        on the nodes between calls, and a later call with the whole context feeds only the
        new tokens. `ttl` (seconds): free it once it has been idle that long. `close()`
        (or garbage collection) frees its KV on the nodes.
        """

        restore = None  # (request, start) while a lost span is recomputed through it

        def __init__(self, cluster, config, *, ttl: float | None = None, session=None,
                     lengths: int = 0):
            from .session import Session

            cfg = config.get_text_config(decoder=True)
            n = cfg.num_hidden_layers
            self.model = getattr(cfg, "model_type", None) or "the model"
            super().__init__(layers=[KflumeLayer(lengths, self.model) for _ in range(n)])
            if session is None:
                session = Session(cluster, n, ttl)
                self._finalizer = weakref.finalize(self, session.close)
            self.session = session

        def crop(self, tokens: int) -> None:
            """Drop the last `-tokens` tokens (transformers 5), or keep the first `tokens`
            (`tokens > 0`, transformers 4); the nodes truncate at the next boundary."""
            length = self.layers[0].length
            drop = -tokens if tokens <= 0 else length - tokens
            if drop <= 0:
                return
            if drop > length:
                raise ValueError(f"kflume: cannot crop {drop} tokens from a cache of {length}")
            self.session.crop(drop)
            for layer in self.layers:
                layer.length -= drop

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            PENDING.set((self, layer_idx, k))  # for the attention function, called next
            return k, v

        def __getattribute__(self, name: str):
            if name in _STATE_APIS:  # linear-attention / state-space layers
                raise Unsupported(f"kflume: {self.model} keeps state-space or linear-attention "
                                  f"state in its cache ({name}), which kflume does not "
                                  "implement (it holds attention KV only)")
            return super().__getattribute__(name)

        def close(self) -> None:
            """Free the session's KV on the nodes."""
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer()

    return KflumeCache


def KflumeCache(cluster, config, *, ttl: float | None = None):  # noqa: N802 - built lazily
    """A transformers Cache whose KV lives on the cluster's attention nodes; kept across
    `generate()` calls, freed by `close()` or after `ttl` idle seconds."""
    return _classes()(cluster, config, ttl=ttl)


def cache_keyword(model) -> str:
    """The keyword the model's forward and generate take a cache by: `cache` in newer
    transformers, `past_key_values` before."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def restore_cache(session, config, request, start: int):
    """A cache for recomputing a lost span of `request` from position `start`: its
    length is `start` (the tokens before the span, on the nodes) and its attention goes
    through `RemoteAttention.extend`."""
    cache = _classes()(session.cluster, config, session=session, lengths=start)
    cache.restore = (request, start)
    return cache
