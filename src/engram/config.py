"""Configuration of the Engram memory, with the field names and defaults of DeepSeek's public demo.

Two variants share the hashing (tokenizer compression, multipliers, prime table sizes) and differ in the
layer around it (:data:`VARIANTS`): ``"demo"``, the paper's public demo, and ``"deepseek-v4.1"``, the Engram
of DeepSeek-V4.1 checkpoints (:meth:`EngramConfig.from_hf_config` reads their ``config.json``). The controls of
the allocation sweep, ``"no-memory"`` and ``"conv-only"`` (:data:`DEMO_ABLATIONS`), are the demo layer with a part
removed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from engram.kernels.fp8 import FP8_SCALE_BLOCK
from engram.primes import next_prime
from engram.tokenizer import NAMED_TOKENIZERS

DEEPSEEK_V41_IMAGE_TOKEN_ID = 129264  # the image placeholder of DeepSeek-V4.1's tokenizer, dead in its engines


def check_rms_norm_eps(eps: object) -> None:
    """Refuse (``ValueError`` naming it) an RMSNorm eps that is not a positive finite number."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"rms_norm_eps must be a positive finite number, got {eps!r}")


def _image_token_ids(config: Mapping[str, Any], text: Mapping[str, Any]) -> list[int] | None:
    """``[image_token_id]`` of a HF config (top level or ``text_config``), ``None`` when it has none."""
    found = {where: m["image_token_id"] for where, m in (("top level", config), ("text_config", text))
             if "image_token_id" in m}
    for value in found.values():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"image_token_id must be a token id, got {value!r}")
    if len(set(found.values())) > 1:
        raise ValueError(" and ".join(f"image_token_id={value} ({where})" for where, value in found.items())
                         + " disagree")
    return list(set(found.values())) or None


@dataclass(frozen=True)
class EngramVariant:
    """How one family of checkpoints builds the Engram layer around the shared hashing.

    Attributes:
        name: the key in :data:`VARIANTS` (and ``EngramConfig.variant``).
        use_short_conv: the demo's ShortConv (RMSNorm, causal depthwise conv, SiLU) follows the gated value.
        projection_bias: the key/value projection has a bias.
        projection_layout: the row blocks of the one fused projection's output: ``"value,keys"`` (the
            shared value, then one key per residual branch) or ``"keys,value"``.
        rms_eps: eps of the gate's two RMSNorms unless the config sets ``rms_norm_eps`` (a checkpoint's config
            always does, see :meth:`EngramConfig.from_hf_config`); ``None`` is fp32 machine epsilon
            (``nn.RMSNorm``'s default).
        masks_dead_tokens: dead positions (e.g. image placeholders) are hashed as pad by every look-back that
            reaches them (see :meth:`engram.hashing.NgramHasher.hash_all`) and get gate 0.
        dead_token_ids: token ids that are always dead unless the config names others (``dead_token_ids``).
        gate_zero_positive: a score of exactly 0 takes the sign +1, so its gate is ``sigmoid(+sqrt(1e-6))``
            (0.50025, as DeepSeek-V4.1's engines compute it) instead of the demo's ``sigmoid(0)`` = 0.5.
        residual_in_fp32: ``h + gate * value`` is computed in fp32 and cast back to the hidden dtype.
        table_format: ``"float"`` (rows in a float dtype) or ``"fp8-e4m3-ue8m0"`` (per row ``head_dim`` FP8
            E4M3 values and one UE8M0 scale byte per :data:`FP8_SCALE_BLOCK` values; value = fp8 * 2^(e - 127)).
        ablation: ``None`` for a whole layer; one of :data:`DEMO_ABLATIONS` for a control of ``engram sweep``: the
            demo layer with a part removed, its tables one row per head (:func:`table_sizes_for`).
    """

    name: str
    use_short_conv: bool
    projection_bias: bool
    projection_layout: str
    rms_eps: float | None
    masks_dead_tokens: bool
    dead_token_ids: tuple[int, ...]
    gate_zero_positive: bool
    residual_in_fp32: bool
    table_format: str
    ablation: str | None = None


_DEMO = EngramVariant("demo", use_short_conv=True, projection_bias=True, projection_layout="value,keys", rms_eps=None,
                      masks_dead_tokens=False, dead_token_ids=(), gate_zero_positive=False, residual_in_fp32=False,
                      table_format="float")
# The controls of the allocation sweep (docs/results/allocation-v2): "no-memory" puts one learned vector in place of
# the rows read (the lookup removed; the same projections, gate and ShortConv); "conv-only" keeps only the ShortConv,
# applied to the hidden state (no projection or gate).
DEMO_ABLATIONS = ("no-memory", "conv-only")

VARIANTS: dict[str, EngramVariant] = {
    v.name: v
    for v in [
        _DEMO,
        *(replace(_DEMO, name=name, ablation=name) for name in DEMO_ABLATIONS),
        EngramVariant("deepseek-v4.1", use_short_conv=False, projection_bias=False, projection_layout="keys,value",
                      rms_eps=1e-20, masks_dead_tokens=True, dead_token_ids=(DEEPSEEK_V41_IMAGE_TOKEN_ID,),
                      gate_zero_positive=True, residual_in_fp32=True, table_format="fp8-e4m3-ue8m0"),
    ]
}


@dataclass
class EngramConfig:
    """Everything that decides which table rows a token reads (and how wide they are).

    Field names and defaults follow ``engram_demo_v1.py`` of deepseek-ai/Engram, except that the
    tokenizer is named by ``tokenizer`` (a registered name such as ``"deepseek-v3"`` or a path to a
    ``tokenizer.json``) instead of a model-hub id: nothing here ever contacts a hub.

    Example:
        >>> cfg = EngramConfig(engram_vocab_size=[1000, 1000], layer_ids=[0])
        >>> EngramConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    tokenizer: str = "deepseek-v3"  # registered name or path to a tokenizer.json
    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])  # prime search start per order 2..max_ngram_size
    max_ngram_size: int = 3  # orders 2..max_ngram_size are hashed
    n_embed_per_ngram: int = 512  # memory width per order, split evenly over the heads
    n_head_per_ngram: int = 8  # hash heads (tables) per order
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])  # 0-based blocks that hold an Engram
    pad_id: int = 2  # original token id used before the start of a sequence (compressed before use)
    seed: int = 0  # multiplier seed; layer l uses seed + 10007 * l
    kernel_size: int = 4  # ShortConv kernel; its dilation is max_ngram_size
    variant: str = "demo"  # a key of VARIANTS: the layer around the hashing (part of the hashing fingerprint)
    compressed_vocab_size: int | None = None  # canonical ids the tokenizer must map onto (checked by NgramHasher)
    # Default (None): the variant's (see _variant_defaults); to_dict writes them only where they differ from it.
    dead_token_ids: list[int] | None = None  # token ids always dead (variants that mask dead tokens)
    rms_norm_eps: float | None = None  # eps of the gate's two RMSNorms (None after defaults: fp32's epsilon)

    def __post_init__(self) -> None:
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        self.layer_ids = [int(v) for v in self.layer_ids]
        if self.variant in VARIANTS:  # else validate() names the bad variant
            for name, default in self._variant_defaults().items():
                if getattr(self, name) is None:
                    setattr(self, name, default)
        if self.dead_token_ids is not None:
            self.dead_token_ids = sorted({int(i) for i in self.dead_token_ids})
        self.validate()

    def _variant_defaults(self) -> dict[str, Any]:
        """The fields that default to the variant's value, with that value."""
        spec = self.variant_spec
        return {"dead_token_ids": list(spec.dead_token_ids), "rms_norm_eps": spec.rms_eps}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its value."""
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"tokenizer must be a registered name or a path, got {self.tokenizer!r}")
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one size per n-gram order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1} values), got {self.engram_vocab_size}"
            )
        for size in self.engram_vocab_size:
            if size < 2:
                raise ValueError(f"engram_vocab_size entries must be >= 2, got {size} in {self.engram_vocab_size}")
        if self.n_head_per_ngram < 1:
            raise ValueError(f"n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram must be a positive multiple of n_head_per_ngram={self.n_head_per_ngram}, "
                f"got {self.n_embed_per_ngram}"
            )
        if not self.layer_ids:
            raise ValueError("layer_ids must name at least one layer, got []")
        for layer_id in self.layer_ids:
            if layer_id < 0:
                raise ValueError(f"layer_ids must be >= 0, got {layer_id} in {self.layer_ids}")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must not repeat, got {self.layer_ids}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.variant_spec.table_format == "fp8-e4m3-ue8m0" and self.head_dim % FP8_SCALE_BLOCK:
            raise ValueError(f"variant {self.variant!r} stores rows in FP8 with one scale per {FP8_SCALE_BLOCK} "
                             f"values: head_dim must be a multiple of {FP8_SCALE_BLOCK}, got {self.head_dim}")
        if self.compressed_vocab_size is not None and self.compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1 (or None), got {self.compressed_vocab_size}")
        if any(i < 0 for i in self.dead_token_ids):
            raise ValueError(f"dead_token_ids must be token ids >= 0, got {self.dead_token_ids}")
        if self.dead_token_ids and not self.variant_spec.masks_dead_tokens:
            raise ValueError(f"variant {self.variant!r} has no dead tokens: dead_token_ids must be empty, got "
                             f"{self.dead_token_ids}")
        if self.rms_norm_eps is not None:
            check_rms_norm_eps(self.rms_norm_eps)
        known = NAMED_TOKENIZERS.get(self.tokenizer)
        # Tokenizers given by path are checked when the hasher loads them (see NgramHasher).
        upper = known.vocab_size if known else None
        if self.pad_id < 0 or (upper is not None and self.pad_id >= upper):
            raise ValueError(
                f"pad_id must be a token id of tokenizer {self.tokenizer!r} (0..{upper - 1 if upper else 'size-1'}), "
                f"got {self.pad_id}"
            )

    @property
    def variant_spec(self) -> EngramVariant:
        """What :attr:`variant` means for the layer (ShortConv, projection, eps, dead tokens, table format)."""
        return VARIANTS[self.variant]

    @property
    def num_orders(self) -> int:
        """Number of hashed n-gram orders (``max_ngram_size - 1``)."""
        return self.max_ngram_size - 1

    @property
    def num_heads(self) -> int:
        """Rows read per token per layer: ``(max_ngram_size - 1) * n_head_per_ngram``."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's row: ``n_embed_per_ngram // n_head_per_ngram``."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """Width of a token's memory vector: ``(max_ngram_size - 1) * n_embed_per_ngram``."""
        return self.num_orders * self.n_embed_per_ngram

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field, less those holding the variant's default (so that configs
        saved before those fields existed, and fingerprints made of them, stay as they were)."""
        data = asdict(self)
        for name, default in self._variant_defaults().items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngramConfig":
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown EngramConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], tokenizer: str = "deepseek-v4") -> "EngramConfig":
        """The Engram of a DeepSeek-V4.1 ``config.json``: the whole dict, or its ``text_config``.

        Reads ``engram_layer_ids`` (0-based), ``engram_max_ngram_size``, ``engram_n_heads`` (per order),
        ``engram_vocab_size`` (the prime search start of every order, or a list of one per order),
        ``engram_head_dim``, ``engram_pad_token_id`` (older configs: ``engram_pad_id``), ``rms_norm_eps`` (the
        backbone's, which the gate's two RMSNorms use, as in the engines) and, when present,
        ``engram_compressed_vocab_size`` (checked against the tokenizer when a hasher is built),
        ``engram_num_embeddings`` (each layer's rows, checked here against the sum of its prime table
        sizes) and ``image_token_id`` (in ``text_config`` or at the top level: the one dead token; without it,
        V4.1's image token :data:`DEEPSEEK_V41_IMAGE_TOKEN_ID`). Multipliers use seed 0, the demo's rule.

        Args:
            config: the parsed ``config.json``, or its ``text_config`` (then a top-level ``image_token_id`` is
                not seen).
            tokenizer: the tokenizer the checkpoint's ids come from (registered name or path).
        Raises:
            ValueError: a key missing or malformed, ``engram_num_embeddings`` not the prime sums (naming both), or
                two ``image_token_id`` that disagree.

        Example:
            >>> text_config = {"engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8,
            ...                "engram_vocab_size": 16_000_000, "engram_head_dim": 256, "engram_pad_token_id": 2,
            ...                "engram_num_embeddings": [384006168, 384016682], "rms_norm_eps": 1e-6}
            >>> cfg = EngramConfig.from_hf_config({"text_config": text_config})
            >>> cfg.variant, cfg.num_heads, cfg.head_dim, cfg.rms_norm_eps, cfg.dead_token_ids
            ('deepseek-v4.1', 24, 256, 1e-06, [129264])
        """
        text = config.get("text_config", config)
        if not isinstance(text, Mapping):
            raise ValueError(f"text_config must be a JSON object, got {type(text).__name__}")
        pad_keys = [key for key in ("engram_pad_token_id", "engram_pad_id") if key in text]
        required = ("engram_layer_ids", "engram_max_ngram_size", "engram_n_heads", "engram_vocab_size",
                    "engram_head_dim", "rms_norm_eps")
        missing = [key for key in required if key not in text] + ([] if pad_keys else ["engram_pad_token_id"])
        if missing:
            found = sorted(key for key in text if key.startswith("engram_"))
            raise ValueError(f"config has no {', '.join(missing)} (its engram_* keys: {found})")
        pads = {text[key] for key in pad_keys}
        if len(pads) > 1:
            raise ValueError(f"engram_pad_token_id={text['engram_pad_token_id']} and its older spelling "
                             f"engram_pad_id={text['engram_pad_id']} disagree")
        max_ngram_size, heads, head_dim = (int(text[key]) for key in
                                           ("engram_max_ngram_size", "engram_n_heads", "engram_head_dim"))
        vocab, compressed = text["engram_vocab_size"], text.get("engram_compressed_vocab_size")
        if head_dim < 1:
            raise ValueError(f"engram_head_dim must be >= 1, got {head_dim}")
        check_rms_norm_eps(text["rms_norm_eps"])
        cfg = cls(
            tokenizer=tokenizer,
            engram_vocab_size=list(vocab) if isinstance(vocab, (list, tuple)) else [vocab] * (max_ngram_size - 1),
            max_ngram_size=max_ngram_size,
            n_embed_per_ngram=heads * head_dim,
            n_head_per_ngram=heads,
            layer_ids=list(text["engram_layer_ids"]),
            pad_id=int(pads.pop()),
            seed=0,
            variant="deepseek-v4.1",
            compressed_vocab_size=None if compressed is None else int(compressed),
            dead_token_ids=_image_token_ids(config, text),
            rms_norm_eps=float(text["rms_norm_eps"]),
        )
        published = text.get("engram_num_embeddings")
        if published is not None:
            sizes = table_sizes_for(cfg)
            computed = [sum(sum(order) for order in sizes[layer]) for layer in cfg.layer_ids]
            if not isinstance(published, (list, tuple)) or [int(n) for n in published] != computed:
                raise ValueError(f"engram_num_embeddings {published} disagrees with the sums of the prime table "
                                 f"sizes {computed} of layers {cfg.layer_ids}")
        return cfg

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngramConfig":
        return cls.from_dict(json.loads(text))


def table_sizes_for(cfg: EngramConfig) -> dict[int, list[list[int]]]:
    """Prime table size per layer (``layer_ids`` order), per order, per head; no prime is used twice.

    Each order's search starts at ``engram_vocab_size[n - 2] - 1`` and each head takes the next prime
    strictly above the previous head's, skipping primes already taken by earlier layers. An ablation variant
    (:data:`DEMO_ABLATIONS`) has one row per head instead: every n-gram hashes to it (``mix mod 1 = 0``).
    """
    if cfg.variant_spec.ablation is not None:
        return {layer_id: [[1] * cfg.n_head_per_ngram for _ in range(cfg.num_orders)] for layer_id in cfg.layer_ids}
    taken: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer_id in cfg.layer_ids:
        per_order = []
        for order_index in range(cfg.num_orders):
            start = cfg.engram_vocab_size[order_index] - 1
            heads = []
            for _ in range(cfg.n_head_per_ngram):
                prime = next_prime(start, taken)
                taken.add(prime)
                heads.append(prime)
                start = prime
            per_order.append(heads)
        sizes[layer_id] = per_order
    return sizes
