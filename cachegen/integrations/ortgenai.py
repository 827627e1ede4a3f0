"""onnxruntime-genai: take the KV cache out of a ``Generator`` and save it with cachegen.

    import onnxruntime_genai as og
    from cachegen.integrations.ortgenai import generator_kv, save_generator
    gen = og.Generator(model, params); gen.append_tokens(prompt_ids)
    save_generator("ctx.cgk", gen, "default")          # present.* trimmed to the real length

A Generator exposes ``get_output("present.N.key")`` as the whole max-length buffer
(``past_present_share_buffer``: ``[batch, kv_heads, max_length, head_dim]``); only the first
``tokens`` positions are the cache, the rest is unused (or stale after ``rewind_to``), so it is
trimmed here. ``tokens`` defaults to ``generator.token_count()``, right after
``append_tokens``; after ``generate_next_token`` the newest token has not been fed through the
model yet, so the cache holds ``token_count() - 1`` tokens: pass that.

Restoring into a Generator: onnxruntime-genai 0.18 has no supported way. Measured on SmolLM2:
``set_model_input("past_key_values.N.key", ...)`` is accepted but ignored (the generator starts
at position 0: the next logits differ from the true continuation by up to 21),
``set_inputs`` is refused for decoder-only models ("use AppendTokens"), and
``snapshot_state`` returns nothing. What does work: ``rewind_to(n)`` keeps a Generator's own
first n tokens for another suffix, and the same exported folder (our export *is* an
onnxruntime-genai model: ``genai_config.json`` + ``model.onnx``) runs with
``cachegen.ort.OrtRunner``, which continues from a restored cache on the CPU
(``runner.continue_from(cachegen.load(path), new_ids)``) or, on CUDA, ``StaticKV.restore`` into
IOBinding buffers.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError

__all__ = ["generator_kv", "save_generator"]

MAX_LAYERS = 4096


def generator_kv(generator: Any, tokens: Optional[int] = None, num_layers: Optional[int] = None) -> list:
    """``[(key, value)]`` numpy copies ``[batch, kv_heads, tokens, head_dim]`` per layer.

    ``num_layers`` defaults to every ``present.N.key`` the generator has."""
    n = int(generator.token_count()) if tokens is None else int(tokens)
    if n < 1:
        raise InputError(f"the generator's cache holds no tokens (tokens={n})")
    out = []
    i = 0
    while num_layers is None or i < num_layers:
        try:
            k = generator.get_output(f"present.{i}.key")
            v = generator.get_output(f"present.{i}.value")
        except RuntimeError:
            if num_layers is None and i > 0:
                break
            raise InputError(f"the generator has no output present.{i}.key/value") from None
        k, v = np.asarray(k), np.asarray(v)
        if k.ndim != 4 or v.ndim != 4 or n > k.shape[2] or n > v.shape[2]:
            raise InputError(f"layer {i}: present buffers {k.shape} / {v.shape} hold fewer than {n} tokens")
        out.append((np.ascontiguousarray(k[:, :, :n]), np.ascontiguousarray(v[:, :, :n])))
        i += 1
        if i > MAX_LAYERS:
            raise InputError("more than 4096 present outputs")
    return out


def save_generator(path: Union[str, os.PathLike], generator: Any, config: Any = "default",
                   tokens: Optional[int] = None) -> int:
    """Save a Generator's cache (trimmed to ``tokens``) as a cachegen container; returns bytes written."""
    import cachegen

    return cachegen.save(path, generator_kv(generator, tokens), config)
