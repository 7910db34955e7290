from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram import DEAD_TOKEN, CompressedTokenizer, EngramConfig, NgramHasher
from engram.primes import is_prime, next_prime
from engram.config import table_sizes_for
from engram.hashing import complete_fingerprint


@lru_cache(maxsize=None)
def reference_is_prime(n: int) -> bool:
    """Trial division by 2 and the odd numbers up to sqrt(n) (independent of engram's Miller-Rabin)."""
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def reference_row_ids(cfg: EngramConfig, lookup: np.ndarray, raw_ids: list[list[int]], layer_id: int) -> list:
    """Row ids stated per token with Python integers, straight from docs/design.md §2."""
    compressed_vocab = int(lookup.max()) + 1
    bound = ((2**63 - 1) // compressed_vocab) // 2
    draws = np.random.default_rng(cfg.seed + 10007 * layer_id).integers(0, max(1, bound), size=cfg.max_ngram_size, dtype=np.int64)
    mults = [int(d) * 2 + 1 for d in draws]
    primes, used = {}, set()
    for layer in cfg.layer_ids:  # table sizes: consecutive distinct primes per layer, order, head
        for n in range(2, cfg.max_ngram_size + 1):
            candidate = cfg.engram_vocab_size[n - 2] - 1
            for head in range(cfg.n_head_per_ngram):
                candidate += 1
                while not reference_is_prime(candidate) or candidate in used:
                    candidate += 1
                used.add(candidate)
                primes[layer, n, head] = candidate
    pad = int(lookup[cfg.pad_id])
    out = []
    for row in raw_ids:
        x = [int(lookup[t]) for t in row]
        per_pos = []
        for t in range(len(x)):
            cols = []
            for n in range(2, cfg.max_ngram_size + 1):
                mix = 0
                for k in range(n):
                    mix ^= (x[t - k] if t - k >= 0 else pad) * mults[k]
                assert mix < 2**63
                cols += [mix % primes[layer_id, n, h] for h in range(cfg.n_head_per_ngram)]
            per_pos.append(cols)
        out.append(per_pos)
    return out


def test_is_prime_matches_trial_division():
    assert [n for n in range(20000) if is_prime(n)] == [n for n in range(20000) if reference_is_prime(n)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)
    assert not is_prime(3215031751)  # strong pseudoprime to bases 2, 3, 5, 7
    assert not is_prime(561) and not is_prime(1)


def test_next_prime_skips_taken():
    assert next_prime(7) == 11
    assert next_prime(6) == 7
    assert next_prime(10, taken={11, 13}) == 17


def test_demo_table_sizes():
    sizes = table_sizes_for(EngramConfig())
    flat = [p for layer in sizes.values() for order in layer for p in order]
    assert len(flat) == 32 == len(set(flat))
    assert sizes[1][0][0] == next_prime(129280 * 5 - 1) and all(reference_is_prime(p) for p in flat)
    assert sizes[15][0][0] > sizes[1][1][-1]  # layer 15 continues past every prime of layer 1


def test_deepseek_v41_table_sums():
    """V4.1's config lists each layer's total rows; the prime rule reproduces both sums exactly."""
    cfg = EngramConfig(engram_vocab_size=[16_000_000] * 3, max_ngram_size=4, n_head_per_ngram=8,
                       n_embed_per_ngram=8 * 256, layer_ids=[1, 14])
    sizes = table_sizes_for(cfg)
    assert [sum(sum(order) for order in sizes[layer]) for layer in (1, 14)] == [384_006_168, 384_016_682]


@pytest.fixture(scope="module")
def demo_hasher(deepseek_ct):
    return NgramHasher(EngramConfig(), tokenizer=deepseek_ct)


def test_demo_config_against_reference(demo_hasher, deepseek_ct):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, deepseek_ct.original_vocab_size, size=(2, 33)).tolist()
    raw[0][:3] = [0, 22898, 19737]
    for layer_id in (1, 15):
        got = demo_hasher.hash(torch.tensor(raw), layer_id)
        assert got.dtype == torch.int64 and got.shape == (2, 33, 16)
        assert got.tolist() == reference_row_ids(demo_hasher.cfg, deepseek_ct.lookup, raw, layer_id)
    all_layers = demo_hasher.hash_all(torch.tensor(raw))
    assert set(all_layers) == {1, 15}
    assert torch.equal(all_layers[15], demo_hasher.hash(torch.tensor(raw), 15))


def _small_ct(small_tokenizer):
    return CompressedTokenizer.from_tokenizer(small_tokenizer, cache_dir=False)


@st.composite
def configs(draw, vocab_size: int):
    max_n = draw(st.integers(2, 5))
    heads = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.one_of(st.integers(2, 50), st.integers(50, 3_000_000)), min_size=max_n - 1, max_size=max_n - 1))
    layers = draw(st.lists(st.integers(0, 60), min_size=1, max_size=3, unique=True))
    return EngramConfig(engram_vocab_size=sizes, max_ngram_size=max_n, n_head_per_ngram=heads,
                        n_embed_per_ngram=heads * draw(st.integers(1, 4)), layer_ids=layers,
                        pad_id=draw(st.integers(0, vocab_size - 1)), seed=draw(st.integers(0, 2**40)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_configs_match_reference(data, deepseek_ct, small_tokenizer):
    ct = data.draw(st.sampled_from([deepseek_ct, _small_ct(small_tokenizer)]), label="tokenizer")
    cfg = data.draw(configs(ct.original_vocab_size), label="cfg")
    batch, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 12))
    raw = data.draw(st.lists(st.lists(st.integers(0, ct.original_vocab_size - 1), min_size=length, max_size=length),
                             min_size=batch, max_size=batch))
    hasher = NgramHasher(cfg, tokenizer=ct)
    layer_id = data.draw(st.sampled_from(cfg.layer_ids))
    got = hasher.hash(torch.tensor(raw), layer_id)
    assert got.tolist() == reference_row_ids(cfg, ct.lookup, raw, layer_id)
    sizes = torch.tensor(hasher.flat_table_sizes(layer_id))
    assert bool((got >= 0).all()) and bool((got < sizes).all())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_n=st.integers(2, 5), length=st.integers(1, 40), cuts=st.lists(st.integers(1, 39), max_size=4),
       seed=st.integers(0, 1000))
def test_pieces_with_history_equal_whole(deepseek_ct, max_n, length, cuts, seed):
    cfg = EngramConfig(engram_vocab_size=[1009] * (max_n - 1), max_ngram_size=max_n, n_head_per_ngram=3,
                       n_embed_per_ngram=6, layer_ids=[0, 7], seed=seed)
    hasher = NgramHasher(cfg, tokenizer=deepseek_ct)
    ids = torch.from_numpy(np.random.default_rng(seed).integers(0, 128_815, size=(2, length)))
    whole = hasher.hash_all(ids)
    bounds = [0] + sorted({c for c in cuts if c < length}) + [length]
    pieces = {layer: [] for layer in cfg.layer_ids}
    for lo, hi in zip(bounds, bounds[1:]):
        history = ids[:, max(0, lo - (max_n - 1)):lo] if lo else None  # shorter than max_n - 1 near the start
        for layer, rows in hasher.hash_all(ids[:, lo:hi], history=history).items():
            pieces[layer].append(rows)
    for layer in cfg.layer_ids:
        assert torch.equal(torch.cat(pieces[layer], dim=1), whole[layer])


def test_single_token_decode_steps(demo_hasher):
    ids = torch.tensor([[0, 22898, 19737, 270, 9327, 1494]])
    whole = demo_hasher.hash(ids, 15)
    for t in range(ids.shape[1]):
        step = demo_hasher.hash(ids[:, t:t + 1], 15, history=ids[:, max(0, t - 2):t])
        assert torch.equal(step[:, 0], whole[:, t])


def test_deterministic_across_instances(deepseek_ct):
    cfg = EngramConfig(engram_vocab_size=[5003, 7001], layer_ids=[3, 4], seed=11)
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, 128_815, size=(4, 64)))
    a = NgramHasher(cfg, tokenizer=deepseek_ct).hash_all(ids)
    b = NgramHasher(cfg, tokenizer=deepseek_ct).hash_all(ids.clone())
    assert all(torch.equal(a[k], b[k]) for k in cfg.layer_ids)


def test_errors(demo_hasher):
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="layer_id 2 is not an Engram layer"):
        demo_hasher.hash(ids, 2)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\], got shape \(3,\)"):
        demo_hasher.hash(ids[0], 1)
    with pytest.raises(ValueError, match=r"history must be \[B=1, H<=2\]"):
        demo_hasher.hash(ids, 1, history=torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"history must be \[B=1"):
        demo_hasher.hash(ids, 1, history=torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="token id 128815"):
        demo_hasher.hash(torch.tensor([[1, 128_815]]), 1)
    with pytest.raises(ValueError, match="token id -3"):
        demo_hasher.hash(ids, 1, history=torch.tensor([[-3]]))


def test_pad_id_checked_against_tokenizer(small_tokenizer):
    cfg = EngramConfig(engram_vocab_size=[11, 11], layer_ids=[0], pad_id=500)
    with pytest.raises(ValueError, match=r"pad_id .* got 500"):
        NgramHasher(cfg, tokenizer=_small_ct(small_tokenizer))


def test_fingerprint_names_the_variant(deepseek_ct):
    demo = NgramHasher(EngramConfig(), tokenizer=deepseek_ct).fingerprint()
    assert demo["variant"] == "demo"
    saved_before_variants = {k: v for k, v in demo.items() if k != "variant"}
    assert complete_fingerprint(saved_before_variants) == demo
    v41 = EngramConfig(engram_vocab_size=[1009] * 3, max_ngram_size=4, n_head_per_ngram=2, n_embed_per_ngram=64,
                       layer_ids=[1], variant="deepseek-v4.1")
    assert NgramHasher(v41, tokenizer=deepseek_ct).fingerprint()["variant"] == "deepseek-v4.1"


def test_compressed_vocab_size_is_checked(deepseek_ct):
    with pytest.raises(ValueError, match="compressed_vocab_size is 99092 but tokenizer 'deepseek-v3' maps onto 98627"):
        NgramHasher(EngramConfig(compressed_vocab_size=99_092), tokenizer=deepseek_ct)
    assert len(NgramHasher(EngramConfig(compressed_vocab_size=98_627), tokenizer=deepseek_ct).tokenizer) == 98_627


def test_dead_mask_and_history_checks(deepseek_ct):
    hasher = NgramHasher(EngramConfig(engram_vocab_size=[1009, 1013], layer_ids=[0]), tokenizer=deepseek_ct)
    ids = torch.tensor([[5, 10**9, 7]])  # the id at a dead position is never read, nor checked
    dead = torch.tensor([[False, True, False]])
    rows = hasher.hash_all(ids, dead_mask=dead)[0]
    pad_only = hasher.hash_all(torch.full((1, 1), hasher.cfg.pad_id))[0][0, 0]
    assert torch.equal(rows[0, 1], pad_only)  # a dead position hashes as an all-pad n-gram
    assert torch.equal(rows[0, 2], hasher.hash_all(torch.tensor([[7]]))[0][0, 0])  # 7 sees pad behind it
    with pytest.raises(ValueError, match=r"token id 1000000000 \(flat index 1\)"):
        hasher.hash_all(ids)
    with pytest.raises(ValueError, match=r"dead_mask must be a bool tensor shaped like input_ids \[1, 3\], got "
                                         r"torch.int64 \[1, 3\]"):
        hasher.hash_all(ids, dead_mask=dead.long())
    with pytest.raises(ValueError, match=r"dead_mask must be .* got torch.bool \[1, 2\]"):
        hasher.hash_all(ids, dead_mask=dead[:, :2])
    with pytest.raises(ValueError, match=r"token id -2 \(flat index 0\)"):  # only DEAD_TOKEN may be negative
        hasher.hash_all(ids[:, :1], history=torch.tensor([[-2]]))
    assert hasher.next_history(ids, dead_mask=dead).tolist() == [[DEAD_TOKEN, 7]]
    assert hasher.next_history(ids[:, :1]).tolist() == [[hasher.cfg.pad_id, 5]]  # pad before the start
    assert hasher.next_history(ids[:, 2:], history=torch.tensor([[DEAD_TOKEN]])).tolist() == [[DEAD_TOKEN, 7]]


@pytest.mark.parametrize("ids, error, match", [
    (torch.zeros(0, 4, dtype=torch.long), ValueError, r"input_ids is an empty batch of shape \(0, 4\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, r"input_ids is an empty batch of shape \(2, 0\)"),
    (torch.tensor([[5, 6]], dtype=torch.uint8), ValueError, "input_ids has dtype torch.uint8.*int32 or int64"),
    (torch.tensor([[5, 6]], dtype=torch.int16), ValueError, "input_ids has dtype torch.int16.*int32 or int64"),
    (torch.tensor([[5.0, 6.0]]), TypeError, "input_ids must be an integer tensor, got dtype torch.float32"),
], ids=["B0", "T0", "uint8", "int16", "float"])
def test_bad_id_batches_are_refused(demo_hasher, ids, error, match):
    calls = [lambda: demo_hasher.hash(ids, 1), lambda: demo_hasher.hash_all(ids)]
    if ids.shape[-1] > 0:  # no tokens is a valid prefix for next_history: the history alone
        calls.append(lambda: demo_hasher.next_history(ids))
    for hash_ids in calls:
        with pytest.raises(error, match=match):
            hash_ids()


def test_next_history_of_no_tokens_is_the_history(demo_hasher):
    history = torch.tensor([[5, 6]])
    assert torch.equal(demo_hasher.next_history(history[:, :0], history), history)


def test_int32_ids_hash_like_int64(demo_hasher):
    ids = torch.randint(0, 128_815, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(demo_hasher.hash(ids.int(), 1), demo_hasher.hash(ids, 1))


def test_hasher_tells_the_kernel_its_modulo_path_from_the_host(demo_hasher, monkeypatch):
    """The fp64-modulo decision is made from the host's primes and passed to the kernel launch, which then reads
    nothing from the device (a read there broke the compiled training graph on CUDA)."""
    import engram.hashing as hashing
    from engram.kernels.hash.naive import FAST_MOD_MAX_PRIME

    primes = [p for sizes in demo_hasher.table_sizes.values() for order in sizes for p in order]
    assert demo_hasher.fast_mod == (max(primes) < FAST_MOD_MAX_PRIME) is True
    seen = []
    real = hashing.ngram_hash
    monkeypatch.setattr(hashing, "ngram_hash", lambda *a, **kw: seen.append(kw.get("fast_mod")) or real(*a, **kw))
    demo_hasher.hash_all(torch.tensor([[5, 6, 7]]))
    assert seen == [True]
