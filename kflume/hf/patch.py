"""kflume.patch(model, cluster): a Hugging Face model's core attention on attention nodes,
through transformers' public extension points only.

- `AttentionInterface.register("kflume", ...)` and `AttentionMaskInterface.register`:
  kflume/hf/attention.py. Models that use the attention-function interface (Llama,
  Mistral, Qwen2, Qwen3, ...) call it after RoPE.
- `model.generate` is wrapped on the instance: a generation without a cache gets a
  `KflumeCache` (freed when it returns); one given a cache parks its session when it
  returns (its KV stays on the nodes for the next call, kflume/hf/session.py), or
  closes it if the call raised. While it runs the cluster's recompute callback
  recomputes lost spans through the model (a node lost mid-generation is recovered inside
  the step, and `generate()` returns the same tokens).
- forward hooks (`register_forward_pre_hook`, `register_forward_hook`) record the tokens
  each forward with a KflumeCache is fed, which a recomputation reads, and mark the
  forward as kflume's while it runs.

`kflume.unpatch(model)` restores the attention implementation and removes the wrapper
and the hook. Model files are untouched.
"""

from __future__ import annotations

import functools

from .attention import kflume_attention, kflume_padding_mask
from .cache import FORWARD, KflumeCache, cache_keyword, hf
from .session import recompute

__all__ = ["patch", "unpatch"]

NAME = "kflume"


def _register() -> None:
    _, AttentionInterface, AttentionMaskInterface, _, _ = hf()
    AttentionInterface.register(NAME, kflume_attention)
    AttentionMaskInterface.register(NAME, kflume_padding_mask)


def patch(model, cluster):
    """Route `model`'s core attention to `cluster`'s attention nodes; returns the model.

    The model's KV geometry must match the cluster's (layers, KV heads, head size, dtype).
    After this, `model.generate(...)` keeps its KV on the nodes; `kflume.unpatch(model)`
    undoes it.
    """
    if getattr(model, "_kflume", None) is not None:
        raise ValueError("model is already patched; unpatch it first")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"kflume: {type(model).__name__} is an encoder-decoder "
                                  "model; kflume serves decoder-only models")
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
        key = next((k for k in ("cache", "past_key_values") if kwargs.get(k) is not None),
                   cache_keyword(model))
        own = kwargs.get(key) is None and kwargs.get("use_cache", True)
        if own:
            kwargs[key] = KflumeCache(cluster, model.config)
        session = getattr(kwargs.get(key), "session", None)
        if session is not None:
            session.usable()
        before = cluster.recompute
        cluster.recompute = recompute(model)
        ok = False
        try:
            out = inner(*args, **kwargs)
            ok = True
            return out
        except (AttributeError, IndexError, RuntimeError, TypeError) as e:
            where = _model_frame(e)
            if where is None:
                raise
            raise NotImplementedError(
                f"kflume: {type(model).__name__} failed in {where} under kflume's attention "
                f"({type(e).__name__}: {e}): it uses an attention or cache feature kflume does "
                "not implement") from e
        finally:
            cluster.recompute = before
            if session is not None:
                if own or not ok:  # a call that raised leaves no half-written step behind
                    session.close()
                else:
                    session.park()

    hooks = (model.register_forward_pre_hook(_enter, with_kwargs=True),
             model.register_forward_hook(_leave, with_kwargs=True, always_call=True))
    model.generate = generate
    model._kflume = (original, cluster, hooks)
    return model


def _enter(module, args, kwargs):
    """A forward begins: with a KflumeCache, its tokens are kept by the session (a lost
    span is recomputed from them)."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    session = getattr(cache, "session", None)
    FORWARD.set((*FORWARD.get(), cache if session is not None else None))
    if session is None or getattr(cache, "restore", None) is not None:
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is not None:
        session.record(ids, kwargs.get("attention_mask"))
    return None


def _leave(module, args, kwargs, output):
    FORWARD.set(FORWARD.get()[:-1])
    return None


def _model_frame(e: BaseException) -> str | None:
    """Where in a transformers model file `e` was raised ("Class.method (file:line)"), or
    None when it was raised elsewhere (kflume's own errors pass through unchanged)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or "/transformers/models/" not in tb.tb_frame.f_code.co_filename.replace(
            "\\", "/"):
        return None
    code = tb.tb_frame.f_code
    name = getattr(code, "co_qualname", code.co_name)  # (3.11+)
    return f"{name} ({code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno})"


def unpatch(model):
    """Undo `patch`: the original attention implementation, no generate wrapper, no hook."""
    state = getattr(model, "_kflume", None)
    if state is None:
        raise ValueError("model is not patched by kflume")
    model.set_attn_implementation(state[0])
    model.__dict__.pop("generate", None)
    for hook in state[2]:
        hook.remove()
    del model._kflume
    return model
