"""Adapters to other libraries (each imports its library only when used).

* :mod:`cachegen.integrations.numcodecs`: ``KVArrayCodec``, a numcodecs codec for KV arrays
  (zarr compressor), registered under the ``numcodecs.codecs`` entry point as ``cachegen_kv``.
* :mod:`cachegen.integrations.zarr3`: the same codec as a zarr v3 array-to-bytes codec.
* :mod:`cachegen.integrations.lmcache`: an LMCache v1 serde plugin (type ``"cachegen"``).
* :mod:`cachegen.integrations.ortgenai`: the KV cache of an onnxruntime-genai ``Generator``.
* :mod:`cachegen.hf` (transformers) lives at the top level.
"""
