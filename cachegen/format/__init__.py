"""The wire format: the only code that reads or writes container bytes (codec_spec/ mirrors it)."""
from .container import (  # noqa: F401
    MAGIC, FORMAT_VERSION, MODE_LOSSY, MODE_LOSSLESS, DTYPE_CODES, DecodeLimits, LayerInfo,
    ChunkEntry, Header, Container, LossyChunk, build_container, parse_container,
    pack_lossy_chunk, parse_lossy_chunk, pack_model_section, chunk_token_count,
)
from .tables import PRECISION_BITS, TOTAL, expand_counts, cdf_of  # noqa: F401
