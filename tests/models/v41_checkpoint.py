"""A synthetic DeepSeek-V4.1 checkpoint: the Engram tensors under V4.1's names, dtypes and layout, at small sizes.

V4.1's hashing (layers 1 and 14, orders 2..4, 8 heads per order, pad id 2, 99,092 canonical ids) with
``engram_vocab_size`` 400 instead of 16,000,000, so a table has ~11k rows; hidden size 64, 4 mHC branches, head
dim 32. The table sizes come from the plain-Python reference in ``test_deepseek_v41.py``, not from engram, and
the FP8 bytes are decoded here by their bit formula in numpy (the tests' reference for what engram reads).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from test_deepseek_v41 import PAD, reference_primes

VOCAB, HIDDEN, BRANCHES, HEAD_DIM, HEADS = 400, 64, 4, 32, 24
RMS_EPS = 1e-6  # the backbone's rms_norm_eps, which the gate's norms use
LAYERS = (1, 14)
TABLE_SHARD = "model-00002-of-00002.safetensors"  # the tables get a shard of their own, as in V4.1
DENSE_SHARD = "model-00001-of-00002.safetensors"


def table_rows() -> dict[int, int]:
    """``{layer: rows of its table}``: the sum of its 24 primes."""
    return {layer: sum(primes) for layer, primes in reference_primes(VOCAB).items()}


def flat_offsets(layer: int) -> np.ndarray:
    """int64 ``[24]``: where each head's rows start in the layer's flat table (the running sum of its primes)."""
    return np.cumsum([0] + reference_primes(VOCAB)[layer][:-1])


def text_config() -> dict:
    """The ``text_config`` of the synthetic checkpoint (with two backbone keys the loader ignores)."""
    rows = table_rows()
    return {
        "engram_layer_ids": list(LAYERS), "engram_max_ngram_size": 4, "engram_n_heads": 8,
        "engram_vocab_size": VOCAB, "engram_num_embeddings": [rows[layer] for layer in LAYERS],
        "engram_head_dim": HEAD_DIM, "engram_pad_token_id": PAD, "engram_compressed_vocab_size": 99_092,
        "hidden_size": HIDDEN, "hc_mult": BRANCHES, "num_hidden_layers": 16, "vocab_size": 129_280,
        "rms_norm_eps": RMS_EPS,
    }


def _e4m3(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random finite E4M3 values (every sign, magnitudes from subnormal to a few hundred)."""
    return (torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-6, 6, shape, generator=gen).float())
            ).clamp(-448, 448).to(torch.float8_e4m3fn)


def _e8m0(shape: tuple[int, ...], low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """Random UE8M0 scale bytes in ``[low, high)`` (2^(e - 127))."""
    return torch.randint(low, high, shape, generator=gen, dtype=torch.uint8).view(torch.float8_e8m0fnu)


def engram_tensors(seed: int = 0, layers: tuple[int, ...] = LAYERS) -> dict[str, torch.Tensor]:
    """Every Engram tensor of ``layers`` under its checkpoint name, random."""
    gen = torch.Generator().manual_seed(seed)
    rows = table_rows()
    out_dim, in_dim = (BRANCHES + 1) * HIDDEN, HEADS * HEAD_DIM
    tensors = {}
    for layer in layers:
        prefix = f"layers.{layer}.engram."
        tensors[prefix + "embed.weight"] = _e4m3((rows[layer], HEAD_DIM), gen)
        tensors[prefix + "embed.scale"] = _e8m0((rows[layer], HEAD_DIM // 32), 118, 134, gen)
        tensors[prefix + "wkv.weight"] = _e4m3((out_dim, in_dim), gen)
        tensors[prefix + "wkv.scale"] = _e8m0((-(-out_dim // 32), -(-in_dim // 32)), 114, 124, gen)
        for name in ("q_weight", "k_weight"):
            tensors[prefix + name] = (0.5 + torch.rand(BRANCHES, HIDDEN, generator=gen)).to(torch.bfloat16)
    return tensors


def backbone_tensors() -> dict[str, torch.Tensor]:
    """A few non-Engram tensors, as a full checkpoint has (the loader must not read them)."""
    return {"embed.weight": torch.ones(8, HIDDEN, dtype=torch.bfloat16),
            "layers.1.attn_norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16)}


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None,
                     sharded: bool = True) -> Path:
    """Write ``config.json`` (``{"text_config": config}``) and the tensors (default: every Engram tensor and the
    backbone's few) into ``folder``: two shards and an index, the tables in the second, or one file."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {**backbone_tensors(), **engram_tensors()} if tensors is None else tensors
    (folder / "config.json").write_text(json.dumps({"architectures": ["DeepseekV41ForCausalLM"],
                                                    "text_config": text_config() if config is None else config}))
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    shards = {name: TABLE_SHARD if ".engram.embed." in name else DENSE_SHARD for name in tensors}
    for shard in (DENSE_SHARD, TABLE_SHARD):
        save_file({name: tensors[name] for name in tensors if shards[name] == shard}, str(folder / shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": shards}, indent=1))
    return folder


def decode_e4m3(raw: np.ndarray) -> np.ndarray:
    """E4M3 bytes -> float64 by the bit formula: sign, 4 exponent bits (bias 7, 0 = subnormal), 3 mantissa bits."""
    raw = raw.astype(np.int64)
    sign = np.where(raw >> 7, -1.0, 1.0)
    exponent, mantissa = (raw >> 3) & 0xF, raw & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    assert not ((exponent == 15) & (mantissa == 7)).any()  # NaN: the synthetic tensors hold none
    return sign * magnitude


def decode_scales(raw: np.ndarray) -> np.ndarray:
    """UE8M0 bytes -> 2^(e - 127) (float64), 255 -> +inf (as vLLM and SGLang decode it)."""
    return np.where(raw == 255, np.inf, 2.0 ** (raw.astype(np.float64) - 127))


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of an FP8 tensor, as uint8."""
    return tensor.view(torch.uint8).numpy()


def decoded_rows(tensors: dict, layer: int, rows: np.ndarray) -> np.ndarray:
    """The values of table rows ``rows`` (any shape) -> ``[..., HEAD_DIM]`` float64."""
    values = decode_e4m3(as_bytes(tensors[f"layers.{layer}.engram.embed.weight"])[rows])
    scales = decode_scales(as_bytes(tensors[f"layers.{layer}.engram.embed.scale"])[rows])
    return values * np.repeat(scales, 32, axis=-1)


def decoded_wkv(tensors: dict, layer: int) -> np.ndarray:
    """``wkv`` ``[(M + 1) D, 24 * HEAD_DIM]`` float64: E4M3 times the scale of its 32x32 block."""
    weight = decode_e4m3(as_bytes(tensors[f"layers.{layer}.engram.wkv.weight"]))
    scales = decode_scales(as_bytes(tensors[f"layers.{layer}.engram.wkv.scale"]))
    blocks = np.repeat(np.repeat(scales, 32, axis=0), 32, axis=1)
    return weight * blocks[:weight.shape[0], :weight.shape[1]]
