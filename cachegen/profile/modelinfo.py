"""What a profile needs to know about a model: per-layer RoPE theta, heads, head_dim."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    n_layers: int
    kv_heads: int
    head_dim: int
    rope_theta: List[float]             # per layer
    windows: List[Optional[int]]        # per layer: None (full attention) or sliding window


def _hf_config(model_dir: Path) -> dict:
    for p in (model_dir / "hf" / "config.json", model_dir / "config.json"):
        if p.is_file():
            c = json.loads(p.read_text())
            return c.get("text_config", c)
    raise ConfigError(f"{model_dir}: no hf/config.json (not a cachegen model export?)")


def model_info(model_dir: os.PathLike | str, name: Optional[str] = None) -> ModelInfo:
    """Read RoPE and shape parameters from an export folder (``cachegen.ort.export``)."""
    d = Path(model_dir)
    c = _hf_config(d)
    n = int(c["num_hidden_layers"])
    heads = int(c.get("num_key_value_heads") or c["num_attention_heads"])
    hd = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    types = c.get("layer_types") or ["full_attention"] * n
    rp = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling")
    if c.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConfigError("partial rotary embeddings are not supported by profiles")

    def theta_for(t: str) -> float:
        p = rp.get(t, rp) if isinstance(rp, dict) else {}
        if p.get("rope_type", "default") not in ("default", None) or (scaling and t != "sliding_attention"):
            raise ConfigError(f"rope type {p.get('rope_type')!r}/{scaling!r} not supported by profiles")
        th = p.get("rope_theta") or c.get("rope_theta")
        if t == "sliding_attention" and c.get("rope_local_base_freq"):
            th = c["rope_local_base_freq"]
        if not th:
            raise ConfigError("model config has no rope_theta")
        return float(th)

    win = c.get("sliding_window")
    return ModelInfo(name=name or c.get("model_type", "model"), n_layers=n, kv_heads=heads, head_dim=hd,
                     rope_theta=[theta_for(t) for t in types],
                     windows=[int(win) if (t == "sliding_attention" and win) else None for t in types])
