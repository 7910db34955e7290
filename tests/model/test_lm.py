import pytest
import torch

from engram.model import EngramLM, EngramLMConfig, MoE
from engram.model.sampling import sample_next

from lm_helpers import VARIANTS, small_config


def make_model(seed=0, **kwargs) -> EngramLM:
    torch.manual_seed(seed)
    return EngramLM(small_config(**kwargs)).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(3, 128_815, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_incremental_logits_equal_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    ids = random_ids(2, 19)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 19)
        pieces = [model(ids[:, :7], cache=cache).logits]  # a prefill, then chunks and single tokens
        t = 7
        for step in (3, 1, 1, 4, 1, 2):
            history = ids[:, max(0, t - 2):t]
            pieces.append(model(ids[:, t:t + step], cache=cache, engram_history=history).logits)
            t += step
    assert t == 19 and cache.seq_len == 19
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["engram-mhc4-moe", "baseline-plain-dense"])
def test_greedy_generation_equals_repeated_argmax(variant):
    model = make_model(**VARIANTS[variant])
    prompt = random_ids(2, 5)
    generated = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert generated.shape == (2, 13) and torch.equal(generated[:, :5], prompt)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            logits = model(ids).logits[:, -1]
            logits[:, model.cfg.tokenizer_vocab_size:] = float("-inf")
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_left_padded_batch_matches_single_prompts():
    model = make_model()
    prompts = [random_ids(1, 6, seed=2)[0], random_ids(1, 3, seed=3)[0]]
    batch = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 6 - len(prompt):] = prompt
        mask[row, 6 - len(prompt):] = 1
    together = model.generate(batch, max_new_tokens=5, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=5, temperature=0)
        assert torch.equal(together[row, 6:], alone[0, len(prompt):])


def test_stops_at_eos_per_sequence():
    model = make_model()
    prompt = random_ids(2, 4, seed=4)
    free = model.generate(prompt, max_new_tokens=6, temperature=0)
    eos = int(free[0, 5])  # the second token row 0 produces
    expected, done = [], torch.zeros(2, dtype=torch.bool)
    for step in range(6):  # greedy tokens until a row emits eos, eos after it; stop once all rows have
        token = torch.where(done, torch.full_like(free[:, 4 + step], eos), free[:, 4 + step])
        expected.append(token)
        done |= token == eos
        if bool(done.all()):
            break
    stopped = model.generate(prompt, max_new_tokens=6, temperature=0, eos_token_id=eos)
    assert torch.equal(stopped, torch.cat([prompt, torch.stack(expected, dim=1)], dim=1))
    assert bool((stopped[0, 5:] == eos).all())


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = make_model()
    prompt = random_ids(2, 4, seed=5)
    a = model.generate(prompt, 6, temperature=0.8, top_p=0.9, seed=7)
    b = model.generate(prompt, 6, temperature=0.8, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 6, temperature=1.3, top_k=1, seed=1),
                       model.generate(prompt, 6, temperature=0))
    assert int(a[:, 4:].max()) < 128_815


def test_sample_next_filters():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.5, 9.0]])
    assert sample_next(logits, temperature=0).item() == 4
    assert sample_next(logits, temperature=0, vocab_limit=4).item() == 0
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=gen).item() for _ in range(200)}
    assert draws == {0, 4}
    # probabilities ~ [0.018, 0.007, ..., 0.975]: top_p=0.9 keeps the top token only
    assert {sample_next(logits, 1.0, top_p=0.9, generator=gen).item() for _ in range(50)} == {4}
    with pytest.raises(ValueError, match="top_p must be in"):
        sample_next(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        sample_next(logits, -1)


def test_training_step_reaches_every_part():
    torch.manual_seed(0)
    cfg = small_config(moe=dict(seq_aux_loss_coef=1e-2))
    model = EngramLM(cfg).train()
    ids = random_ids(3, 17, seed=6)
    out = model(ids, labels=ids)
    assert out.loss is not None and out.aux_loss is not None and out.aux_loss > 0
    (out.loss + out.aux_loss).backward()
    named = dict(model.named_parameters())
    for name in ("embed.weight", "blocks.0.engram.multi_head_embedding.weight", "blocks.0.engram.value_key_proj.weight",
                 "blocks.1.attn_hc.phi", "blocks.1.ffn.router.weight", "blocks.1.ffn.w1", "blocks.2.attn.q_proj.weight",
                 "merge.phi", "blocks.2.engram.short_conv.conv.weight"):
        grad = named[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    before = [moe.expert_bias.clone() for moe in model.moe_layers]
    model.update_router_biases()
    assert any(not torch.equal(b, moe.expert_bias) for b, moe in zip(before, model.moe_layers))


def test_router_load_stats_are_each_layers_max_over_mean_load_and_its_expert():
    model = EngramLM(small_config())  # two MoE layers
    assert model.router_load_stats() is None  # no forward yet
    model(random_ids(2, 9, seed=1))
    loads = [moe.last_load.float() for moe in model.moe_layers]
    assert len(loads) >= 2
    expected = [float(load.max() / load.mean()) for load in loads]
    stats = model.router_load_stats()
    assert stats["imbalance"] == pytest.approx(expected) and min(expected) >= 1.0
    assert stats["hot_expert"] == [int(load.argmax()) for load in loads]
    moe, tokens = model.moe_layers[-1], 2 * 9
    moe.last_load = torch.full_like(moe.last_load, tokens * (moe.cfg.top_k - 1) // (moe.cfg.num_experts - 1))
    moe.last_load[3] = tokens  # every token sends one of its picks to expert 3
    stats = model.router_load_stats()
    assert stats["imbalance"][:-1] == pytest.approx(expected[:-1])
    assert stats["imbalance"][-1] == pytest.approx(tokens / moe.last_load.float().mean())
    assert stats["hot_expert"][-1] == 3


def test_hash_ids_computed_once_per_forward(monkeypatch):
    model = make_model()
    calls = []
    original = model.hasher.hash_all
    monkeypatch.setattr(model.hasher, "hash_all", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(model.hasher, "hash", lambda *a, **k: pytest.fail("per-layer hashing in forward"))
    model(random_ids(1, 5))
    assert len(calls) == 1


def test_conv_zero_init_and_plain_init():
    model = EngramLM(small_config(engram_conv_zero_init=True))
    assert all(block.engram is None or not block.engram.short_conv.conv.weight.any() for block in model.blocks)
    model = EngramLM(small_config())
    assert all(isinstance(b.ffn, MoE) == (k == "moe") for b, k in zip(model.blocks, model.cfg.ffn_kinds))


def test_input_errors():
    model = make_model()
    with pytest.raises(ValueError, match=r"input_ids must be a \[B, T\] tensor, got \(5,\)"):
        model(random_ids(1, 5)[0])
    with pytest.raises(TypeError, match="float32"):
        model(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"token id 129280 is outside the model's vocabulary \[0, 129280\)"):
        model(torch.tensor([[5, 129_280]]))
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than max_position_embeddings=64"):
        model(random_ids(1, 65))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, S\]"):
        model(random_ids(1, 5), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
        model.generate(random_ids(1, 60), max_new_tokens=5)
    with pytest.raises(ValueError, match="token id 128900"):  # embedding padding has no Engram row
        model(torch.tensor([[5, 128_900]]))


def test_config_round_trip_and_errors():
    cfg = small_config()
    assert EngramLMConfig.from_json(cfg.to_json()) == cfg
    assert EngramLMConfig.from_preset("tiny", d_model=48).d_model == 48
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        EngramLMConfig.from_preset("huge")
    with pytest.raises(ValueError, match="n_heads must be a multiple of n_kv_heads=3, got 4"):
        small_config(n_kv_heads=3)
    with pytest.raises(ValueError, match=r"ffn_kinds needs one entry per layer \(3\)"):
        small_config(ffn_kinds=["dense"])
    with pytest.raises(ValueError, match="ffn_kinds entries must be one of .* got 'sparse'"):
        small_config(ffn_kinds=["dense", "sparse", "moe"])
    with pytest.raises(ValueError, match=r"name blocks past n_layers=2: \[2\]"):
        small_config(n_layers=2, ffn_kinds=["dense", "moe"])
    v41 = small_config().to_dict()
    v41["engram"].update(variant="deepseek-v4.1", n_embed_per_ngram=64, n_head_per_ngram=2)
    with pytest.raises(ValueError, match="engram.variant 'deepseek-v4.1'.*load_deepseek_v41_engram"):
        EngramLMConfig.from_dict(v41)
    with pytest.raises(ValueError, match="moe.top_k must be <= num_experts=5, got 6"):
        small_config(moe=dict(num_experts=5, top_k=6))


@pytest.mark.parametrize("ids, match", [
    (torch.zeros(0, 5, dtype=torch.long), r"input_ids is an empty batch of shape \(0, 5\)"),
    (torch.zeros(2, 0, dtype=torch.long), r"input_ids is an empty batch of shape \(2, 0\)"),
    (torch.tensor([[5, 6]], dtype=torch.uint8), "input_ids has dtype torch.uint8, too narrow for token ids"),
    (torch.tensor([[5, 6]], dtype=torch.int16), "input_ids has dtype torch.int16, too narrow for token ids"),
], ids=["B0", "T0", "uint8", "int16"])
def test_bad_id_batches_are_refused(ids, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model(ids)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, max_new_tokens=1)


def test_int32_ids_give_the_logits_of_int64():
    model = make_model()
    ids = random_ids(2, 6)
    assert torch.equal(model(ids.int()).logits, model(ids).logits)
    assert torch.equal(model.generate(ids.int(), max_new_tokens=3, temperature=0),
                       model.generate(ids, max_new_tokens=3, temperature=0))
