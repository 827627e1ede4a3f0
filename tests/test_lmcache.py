"""The LMCache serde plugin against the real lmcache package (skipped where it is not installed:
it pins numpy <= 2.2.6, so it lives in its own environment, see tests/lmcache_venv/run.sh)."""
from __future__ import annotations

import select
import time

import numpy as np
import pytest

lmcache = pytest.importorskip("lmcache")
torch = pytest.importorskip("torch")

import cachegen  # noqa: E402
from cachegen.integrations import lmcache as plugin  # noqa: E402
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.serde.base import SerdeConfig  # noqa: E402
from lmcache.v1.distributed.serde.factory import create_serde_processor, get_registered_serde_types  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj  # noqa: E402

L, T, H, D = 4, 256, 2, 64


def _obj(shape, dtype, fmt):
    shape = torch.Size(shape)
    n = shape.numel() * torch.tensor([], dtype=dtype).element_size()
    meta = MemoryObjMetadata(shape=shape, dtype=dtype, address=0, phy_size=n, ref_count=1, fmt=fmt)
    return TensorMemoryObj(torch.zeros(n, dtype=torch.uint8), meta, None)


def _kv_obj(dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # keys with per-channel offsets/scales, values plain: like a real cache, and coded like one
    x = torch.randn(2, L, T, H * D, generator=g)
    x[0] = x[0] * torch.linspace(0.3, 3, H * D) + torch.randn(H * D, generator=g)
    src = _obj((2, L, T, H * D), dtype, MemoryFormat.KV_2LTD)
    src.tensor.copy_(x.to(dtype))
    return src


def _buf(ser, src):
    n = ser.estimate_serialized_size(MemoryLayoutDesc(shapes=[src.tensor.shape], dtypes=[src.tensor.dtype]))
    return _obj((n,), torch.uint8, MemoryFormat.BINARY_BUFFER)


KEY = ObjectKey(chunk_hash=b"\x01" * 32, model_name="test-model", kv_rank=0)


def _ours(stored: bytes, dtype):
    """What cachegen's own decoder makes of the stored bytes, in the KV_2LTD layout."""
    kv = cachegen.decode(plugin.unwrap(stored))
    return torch.stack([torch.stack([k[0].permute(1, 0, 2).reshape(T, H * D) for k in pair]) for pair in kv], 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("preset", ["default", "lossless"])
def test_round_trip_bit_exact_with_our_decoder(dtype, preset):
    ser, de = plugin.CacheGenSerializer(preset, num_kv_heads=H), plugin.CacheGenDeserializer()
    src = _kv_obj(dtype)
    buf = _buf(ser, src)
    n = ser.serialize(src, buf, KEY)
    assert 0 < n <= buf.get_size()
    stored = bytes(buf.tensor[:n].numpy())
    dst = _obj((2, L, T, H * D), dtype, MemoryFormat.KV_2LTD)
    de.deserialize(buf, dst, KEY)
    assert torch.equal(dst.tensor, _ours(stored, dtype))
    if preset == "lossless":
        assert torch.equal(dst.tensor, src.tensor)
    else:
        assert n < src.tensor.numel() * 2 / 2.5              # well under fp16
        err = (dst.tensor.float() - src.tensor.float()).abs().max()
        assert 0 < err < 0.5


def _wait(fd, query, task, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        select.select([fd], [], [], 0.5)
        r = query(task)
        if r is not None:
            return r
    raise TimeoutError


def test_through_lmcache_factory_and_async_processor():
    assert plugin.SERDE_TYPE in get_registered_serde_types()
    proc = create_serde_processor(SerdeConfig("cachegen", {"preset": "small", "num_kv_heads": H}))
    try:
        src = _kv_obj()
        est = proc.estimate_serialized_size(MemoryLayoutDesc(shapes=[src.tensor.shape], dtypes=[src.tensor.dtype]))
        assert est >= 2 * src.tensor.numel()                  # an upper bound, never too small
        buf = _obj((est,), torch.uint8, MemoryFormat.BINARY_BUFFER)
        task = proc.submit_serialize([src], [buf], [KEY])
        assert _wait(proc.get_serialize_event_fd(), proc.query_serialize_result, task) is True
        stored_n = buf.get_size()                             # narrowed to the bytes written
        assert stored_n < est / 3
        stored = bytes(buf.byte_array)
        # what the L2 tier hands back on load: the stored bytes in a fresh estimate-sized buffer
        back = _obj((est,), torch.uint8, MemoryFormat.BINARY_BUFFER)
        back.tensor[:stored_n].copy_(torch.frombuffer(bytearray(stored), dtype=torch.uint8))
        dst = _obj((2, L, T, H * D), torch.float16, MemoryFormat.KV_2LTD)
        task = proc.submit_deserialize([back], [dst], [KEY])
        assert _wait(proc.get_deserialize_event_fd(), proc.query_deserialize_result, task) is True
        assert torch.equal(dst.tensor, _ours(stored, torch.float16))
        # a damaged chunk fails the task (a miss for LMCache), it does not fill the destination
        back.tensor[stored_n // 2] ^= 0x40
        dst2 = _obj((2, L, T, H * D), torch.float16, MemoryFormat.KV_2LTD)
        task = proc.submit_deserialize([back], [dst2], [KEY])
        assert _wait(proc.get_deserialize_event_fd(), proc.query_deserialize_result, task) is False
    finally:
        proc.close()


def test_bad_inputs():
    de = plugin.CacheGenDeserializer()
    dst = _obj((2, L, T, H * D), torch.float16, MemoryFormat.KV_2LTD)
    junk = _obj((100,), torch.uint8, MemoryFormat.BINARY_BUFFER)
    with pytest.raises(cachegen.FormatError, match="magic"):
        de.deserialize(junk, dst, KEY)
    ser = plugin.CacheGenSerializer("default")
    src = _kv_obj()
    buf = _buf(ser, src)
    n = ser.serialize(src, buf, KEY)
    wrong = _obj((2, L, T, H * D), torch.bfloat16, MemoryFormat.KV_2LTD)
    with pytest.raises(cachegen.FormatError, match="dtype|float"):
        de.deserialize(buf, wrong, KEY)
    cut = _obj((n - 10,), torch.uint8, MemoryFormat.BINARY_BUFFER)
    cut.tensor.copy_(buf.tensor[:n - 10])
    with pytest.raises(cachegen.FormatError):
        de.deserialize(cut, dst, KEY)
    with pytest.raises(cachegen.InputError):
        ser.serialize(_obj((3, 4), torch.float16, MemoryFormat.UNDEFINED), buf, KEY)
    with pytest.raises(cachegen.InputError):
        create_serde_processor(SerdeConfig("cachegen", {"presett": "x"}))
    with pytest.raises(cachegen.ConfigError):
        create_serde_processor(SerdeConfig("cachegen", {"preset": "medium"}))
