"""``KVArrayCodec`` as a zarr v3 array-to-bytes codec (a "serializer").

    import zarr
    from cachegen.integrations.zarr3 import CacheGenKV
    z = zarr.create_array(store, shape=(L, 2, B, H, T, D), chunks=(1, 2, B, H, 256, D),
                          dtype="float16", serializer=CacheGenKV(preset="default"), compressors=None)

Registered for reading under zarr's ``zarr.codecs`` entry point as ``numcodecs.cachegen_kv``
(the naming zarr uses for numcodecs codecs), so an array written with it opens without
importing cachegen first. zarr v2-format arrays take the numcodecs codec directly
(``compressors=KVArrayCodec()``, see :mod:`cachegen.integrations.numcodecs`).
"""
from __future__ import annotations

from .._deps import require

require("zarr")
# zarr's own wrapper of numcodecs array->bytes codecs (what its PCodec and ZFPY use)
from zarr.codecs.numcodecs._codecs import _NumcodecsArrayBytesCodec  # noqa: E402

from . import numcodecs as _nc  # noqa: E402,F401  (registers cachegen_kv with numcodecs)

__all__ = ["CacheGenKV"]


class CacheGenKV(_NumcodecsArrayBytesCodec, codec_name="cachegen_kv"):
    """``CacheGenKV(preset="default", config={...}, role="key")``: see ``KVArrayCodec``."""
