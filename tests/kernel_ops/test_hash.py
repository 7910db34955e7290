"""The fused n-gram hash (Triton on the GPU, or through its CPU interpreter without one; and plain torch) against
NgramHasher.hash_all. ``device`` and TRITON_INTERPRET come from conftest.py."""

import numpy as np
import pytest
import torch

import engram.kernels.dispatch as dispatch
from engram import CompressedTokenizer, EngramConfig, NgramHasher
from engram.kernels.hash import DEAD_TOKEN, ngram_hash, ngram_hash_decode
from engram.kernels.hash.naive import ngram_hash_naive
from kernel_ops.conftest import compile_for_h200


@pytest.fixture(scope="module")
def tiny_ct() -> CompressedTokenizer:
    # 40 original ids onto 7 compressed ids: the multipliers get close to int64max / 7.
    return CompressedTokenizer(np.random.default_rng(0).integers(0, 7, size=40).astype(np.int64))


def _constants(hasher: NgramHasher, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layers = hasher.cfg.layer_ids
    return (torch.from_numpy(hasher.tokenizer.lookup).to(device),
            torch.tensor([hasher.multipliers[l] for l in layers], device=device),
            torch.tensor([hasher.table_sizes[l] for l in layers], device=device))


def _stack(rows: dict[int, torch.Tensor], hasher: NgramHasher) -> torch.Tensor:
    return torch.stack([rows[layer] for layer in hasher.cfg.layer_ids])


# (max_ngram_size, heads, layer_ids, batch, length, engram_vocab_size per order, history length or None)
CASES = [
    (2, 1, [0], 1, 1, 1009, None),
    (3, 8, [1, 15], 3, 67, 129280 * 5, None),
    (3, 8, [1, 15], 3, 67, 129280 * 5, 2),
    (5, 3, [2, 9], 1, 5, 400_000_000, None),
    (5, 3, [4], 3, 67, 400_000_000, 4),
    (5, 1, [0, 3], 3, 5, 57, 2),
    (2, 3, [0, 1], 1, 67, 400_000_000, 1),
    (3, 1, [7], 3, 1, 400_000_000, 1),
]


@pytest.mark.parametrize("tokenizer", ["deepseek", "tiny"])
@pytest.mark.parametrize("max_n, heads, layer_ids, batch, length, table, history_len", CASES)
def test_matches_hasher(deepseek_ct, tiny_ct, device, tokenizer, max_n, heads, layer_ids, batch, length, table,
                        history_len):
    ct = deepseek_ct if tokenizer == "deepseek" else tiny_ct
    cfg = EngramConfig(engram_vocab_size=[table + 100 * n for n in range(max_n - 1)], max_ngram_size=max_n,
                       n_head_per_ngram=heads, n_embed_per_ngram=heads, layer_ids=layer_ids, pad_id=3)
    hasher = NgramHasher(cfg, tokenizer=ct)
    rng = np.random.default_rng([max_n, heads, batch, length, len(ct)])
    ids = torch.from_numpy(rng.integers(0, ct.original_vocab_size, size=(batch, length))).to(device)
    history = None
    if history_len is not None:
        history = torch.from_numpy(rng.integers(0, ct.original_vocab_size, size=(batch, history_len))).to(device)
    # force=False: the torch path (what the default picks on CPU; on CUDA the default is Triton, checked below).
    expected = _stack(hasher.hash_all(ids, history, force=False), hasher)
    for force in (True, False, None):
        got = hasher.hash_all(ids, history, force=force)
        assert list(got) == layer_ids
        assert torch.equal(_stack(got, hasher), expected)

    if history is not None:  # the raw op, with the caller left-padding history with the original pad id
        padded = torch.cat([torch.full((batch, max_n - 1 - history_len), cfg.pad_id, device=device), history], dim=1)
        consts = _constants(hasher, device)
        assert torch.equal(ngram_hash(ids, *consts, hasher.pad_id, padded, force=True), expected)
        assert torch.equal(ngram_hash_naive(ids, *consts, hasher.pad_id, padded), expected)


@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize("max_n, heads, batch", [(2, 2, 3), (3, 8, 1), (5, 3, 67)])
def test_decode_steps_equal_whole(deepseek_ct, device, force, max_n, heads, batch):
    cfg = EngramConfig(engram_vocab_size=[400_000_000] * (max_n - 1), max_ngram_size=max_n, n_head_per_ngram=heads,
                       n_embed_per_ngram=heads, layer_ids=[1, 6])
    hasher = NgramHasher(cfg, tokenizer=deepseek_ct)
    consts = _constants(hasher, device)
    ids = torch.from_numpy(np.random.default_rng(batch).integers(0, 128_815, size=(batch, 7))).to(device)
    whole = ngram_hash(ids, *consts, hasher.pad_id, force=False)
    history = torch.full((batch, max_n - 1), cfg.pad_id, device=device)
    for t in range(ids.shape[1]):
        step = ngram_hash_decode(ids[:, t], history, *consts, hasher.pad_id, force=force)
        assert torch.equal(step, whole[:, :, t])
    assert torch.equal(history, ids[:, -(max_n - 1):])


def test_decode_continues_a_prefill_history(deepseek_ct, device):
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[5003, 7001, 9001], max_ngram_size=4, n_head_per_ngram=2,
                                      n_embed_per_ngram=2, layer_ids=[0, 2]), tokenizer=deepseek_ct)
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 128_815, size=(2, 9))).to(device)
    whole = _stack(hasher.hash_all(ids, force=False), hasher)
    history = ids[:, 3:6].clone()
    for t in range(6, 9):
        assert torch.equal(ngram_hash_decode(ids[:, t], history, *_constants(hasher, device), hasher.pad_id,
                                             force=True), whole[:, :, t])


DEAD_CASES = [(2, 1, [0], 1, 1, None), (3, 8, [1, 15], 3, 67, 2), (4, 8, [1, 14], 2, 37, 3), (5, 3, [2, 9], 3, 5, 4),
              (5, 1, [0, 3], 3, 33, None)]


@pytest.mark.parametrize("max_n, heads, layer_ids, batch, length, history_len", DEAD_CASES)
def test_dead_tokens_triton_equals_torch(deepseek_ct, device, max_n, heads, layer_ids, batch, length, history_len):
    """Dead positions (DEAD_TOKEN in ids and history), lone and in runs: both paths, prefill and decode, agree."""
    cfg = EngramConfig(engram_vocab_size=[16_000_000 + 7 * n for n in range(max_n - 1)], max_ngram_size=max_n,
                       n_head_per_ngram=heads, n_embed_per_ngram=heads, layer_ids=layer_ids)
    hasher = NgramHasher(cfg, tokenizer=deepseek_ct)
    consts = _constants(hasher, device)
    rng = np.random.default_rng([max_n, heads, batch, length])
    ids = torch.from_numpy(rng.integers(0, 128_815, size=(batch, length))).to(device)
    dead = torch.from_numpy(rng.random((batch, length)) < 0.3).to(device)
    dead[:, length // 2 : length // 2 + 3] = True
    history = None
    if history_len is not None:
        history = torch.from_numpy(rng.integers(0, 128_815, size=(batch, history_len))).to(device)
        history[:, -1] = DEAD_TOKEN
    expected = _stack(hasher.hash_all(ids, history, force=False, dead_mask=dead), hasher)
    assert torch.equal(_stack(hasher.hash_all(ids, history, force=True, dead_mask=dead), hasher), expected)
    live = _stack(hasher.hash_all(ids, history, force=False), hasher)
    assert not torch.equal(live, expected)

    state = hasher.next_history(ids[:, :0], history)
    for force in (True, False):
        step_history = state.clone()
        for t in range(length):
            new = ids[:, t].masked_fill(dead[:, t], DEAD_TOKEN)
            step = ngram_hash_decode(new, step_history, *consts, hasher.pad_id, force=force)
            assert torch.equal(step, expected[:, :, t]), (force, t)
        assert torch.equal(step_history, hasher.next_history(ids, history, dead_mask=dead))


def test_empty_inputs(deepseek_ct, device):
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0]), tokenizer=deepseek_ct)
    consts = _constants(hasher, device)
    no_tokens = torch.zeros(2, 0, dtype=torch.long, device=device)
    assert ngram_hash(no_tokens, *consts, hasher.pad_id, force=True).shape == (1, 2, 0, 16)
    no_rows = torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, 2, dtype=torch.long, device=device)
    assert ngram_hash_decode(*no_rows, *consts, hasher.pad_id, force=True).shape == (1, 0, 16)


def test_errors(deepseek_ct, monkeypatch):
    # CPU tensors on purpose, on any machine: without the interpreter, forcing Triton on them must raise.
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0]), tokenizer=deepseek_ct)
    consts = _constants(hasher)
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        hasher.hash_all(torch.tensor([[5, 128_815]]))
    with pytest.raises(ValueError, match="history must be"):
        hasher.hash_all(ids, history=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="history must be an int64 tensor of shape"):
        ngram_hash(ids, *consts, hasher.pad_id, history=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="contiguous"):
        ngram_hash_decode(torch.tensor([5]), torch.zeros(1, 4, dtype=torch.long)[:, ::2], *consts, hasher.pad_id)
    monkeypatch.setattr(dispatch, "interpret_mode", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ngram_hash(ids, *consts, hasher.pad_id, force=True)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ngram_hash_decode(torch.tensor([5]), torch.zeros(1, 2, dtype=torch.long), *consts, hasher.pad_id, force=True)


# Largest primes below 2^32, 2^40 and 2^50 (FAST_MOD_MAX_PRIME, the bound of the kernels' fp64 modulo).
FAST_PRIMES = [2, 3, 65537, 646_301, 4_294_967_291, 1_099_511_627_689, (1 << 49) + 9, 1_125_899_906_842_597]


def _adversarial_mixes(primes: list[int], seed: int) -> list[int]:
    """Mixes in [0, 2^63) where an fp64 quotient is most likely to land on the wrong side of an integer."""
    top = (1 << 63) - 1
    values = {0, 1, 2, top, top - 1, top - 511, top - 512, top - 513, 1 << 62, (1 << 62) - 1, (1 << 53) + 1,
              (1 << 53) - 1, 1 << 52, (1 << 32) - 1, 1 << 32}
    rng = np.random.default_rng(seed)
    for p in primes:
        for k in (1, 2, 4097, top // p, top // p - 1, (1 << 53) // p, *(int(x) for x in rng.integers(1, top // p, 4))):
            values.update(v for v in (k * p - 1, k * p, k * p + 1, k * p + p // 2) if 0 <= v <= top)
    values.update(int(x) for x in rng.integers(0, top, 64, dtype=np.int64, endpoint=True))
    return sorted(values)


@pytest.mark.parametrize("primes, fast", [(FAST_PRIMES, True), ([2, 1_125_899_906_842_597, (1 << 50) + 55,
                                                                   (1 << 61) - 1], False)])
def test_modulo_is_exact_on_extreme_mixes(device, primes, fast):
    # multipliers [1, 0]: the mix of token t is lookup[raw_t] itself, so the lookup table carries the mixes.
    from engram.kernels.hash.naive import FAST_MOD_MAX_PRIME
    from engram.kernels.hash.op import _fast_mod

    mixes = _adversarial_mixes(primes, len(primes))
    lookup = torch.tensor(mixes, device=device)
    multipliers = torch.tensor([[1, 0]], device=device)
    primes_t = torch.tensor([[primes]], device=device)
    assert _fast_mod(primes_t, None) == fast == (max(primes) < FAST_MOD_MAX_PRIME)
    expected = torch.tensor([[[m % p for p in primes] for m in mixes]], device=device)  # exact Python ints
    ids = torch.arange(len(mixes), device=device)
    assert torch.equal(ngram_hash_naive(ids[None], lookup, multipliers, primes_t, 0), expected[:, None])
    assert torch.equal(ngram_hash(ids[None], lookup, multipliers, primes_t, 0, force=True), expected[:, None])
    # the caller's answer (NgramHasher knows its primes on the host) gives the same rows without reading them
    assert torch.equal(ngram_hash(ids[None], lookup, multipliers, primes_t, 0, force=True, fast_mod=fast),
                       expected[:, None])
    history = torch.zeros(len(mixes), 1, dtype=torch.long, device=device)
    assert torch.equal(ngram_hash_decode(ids, history, lookup, multipliers, primes_t, 0, force=True), expected)
    assert torch.equal(history[:, 0], ids)


COMPILE_FOR_H200 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engram.kernels.hash import triton_hash as k

def build(fn, signature, constexprs):
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    return triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]

ptrs = {"lookup_ptr": "*i64", "mult_ptr": "*i64", "primes_ptr": "*i64", "out_ptr": "*i64"}
for fast in (True, False):
    ptx = build(k.ngram_hash_kernel, {"raw_ptr": "*i64", "hist_ptr": "*i64", **ptrs, "T": "i32", "B": "i32",
                "pad_id": "i32"}, {"L": 2, "N": 3, "K": 8, "HP": 16, "HAS_HISTORY": True, "BLOCK_T": 64,
                "FAST_MOD": fast})
    # The fast path must not fall back on the emulated 64-bit division.
    assert ("rem.s64" in ptx) != fast, fast
    build(k.ngram_hash_decode_kernel, {"new_ptr": "*i64", "hist_ptr": "*i64", **ptrs, "B": "i32", "pad_id": "i32"},
          {"L": 2, "N": 5, "K": 3, "HP": 16, "BLOCK_B": 64, "FAST_MOD": fast})
"""


def test_kernels_compile_for_an_h200_without_one():
    compile_for_h200(COMPILE_FOR_H200)