"""EngramOptimizer: parameter groups, lazy sparse tables, weight decay, schedule, resume, Muon."""

import io
import json
import math
from dataclasses import asdict
from functools import lru_cache

import pytest
import torch
from torch import nn

from engram import EngramConfig
from engram.embedding import MultiHeadEmbedding
from engram.hashing import NgramHasher
from engram.model import EngramLM, EngramLMConfig
from engram.model.config import MoEConfig
from engram.train.optim import (EngramOptimizer, Muon, OptimConfig, enable_sparse_tables, lr_at, muon_scale,
                                newton_schulz, param_groups)

VOCAB = 512


def lm_config(**overrides) -> EngramLMConfig:
    """A 3-block model with Engram at blocks 0 and 2, MoE at 1 and 2, mHC with 2 streams, untied head."""
    fields = dict(
        vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, max_position_embeddings=32,
        ffn_kinds=["dense", "moe", "moe"], dense_ffn_dim=48,
        moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_dim=16), hc_mult=2,
        engram=EngramConfig(engram_vocab_size=[311, 313], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0, 2]),
        engram_conv_zero_init=False, tie_embeddings=False, init_std=0.1,
    )
    fields.update(overrides)
    return EngramLMConfig(**fields)


@lru_cache(maxsize=None)
def shared_hasher(cfg_json: str) -> NgramHasher:
    return NgramHasher(EngramConfig.from_json(cfg_json))


def small_lm(seed: int = 0, sparse: bool = True, **overrides) -> EngramLM:
    cfg = lm_config(**overrides)
    torch.manual_seed(seed)
    model = EngramLM(cfg, hasher=shared_hasher(cfg.engram.to_json()))
    if sparse:
        enable_sparse_tables(model)
    return model


def batches(n: int, seed: int = 1, batch: int = 2, length: int = 12) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, length), generator=gen) for _ in range(n)]


def train(model: EngramLM, opt: EngramOptimizer, data: list[torch.Tensor], start: int = 0,
          max_steps: int = 20) -> list[float]:
    losses = []
    for i, ids in enumerate(data):
        opt.set_lr(start + i, max_steps)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.clip_grad_norm()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def tables(model: EngramLM) -> dict[int, MultiHeadEmbedding]:
    return {b.layer_idx: b.engram.multi_head_embedding for b in model.blocks if b.engram is not None}


def read_rows(model: EngramLM, data: list[torch.Tensor], positions: slice = slice(None)) -> dict[int, torch.Tensor]:
    """Rows of each layer's flat table that ``data`` reads at ``positions``, as a bool mask."""
    masks = {layer: torch.zeros(t.num_rows, dtype=torch.bool) for layer, t in tables(model).items()}
    for ids in data:
        for layer, hashed in model.hasher.hash_all(ids).items():
            masks[layer][tables(model)[layer].flat_row_ids(hashed[:, positions]).flatten()] = True
    return masks


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Textbook quintic Newton-Schulz of one matrix in float64."""
    x = g.double()
    if x.shape[0] > x.shape[1]:
        return reference_newton_schulz(g.T, steps).T
    x = x / x.norm()
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x
    return x



def test_config_round_trips_through_json_and_rejects_bad_values():
    cfg = OptimConfig(muon=True, schedule="step", step_decay_at=(0.5, 0.75))
    assert OptimConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    for field, value in [("lr", 0.0), ("weight_decay", -0.1), ("betas", (0.9, 1.0)), ("eps", 0.0),
                         ("table_lr_mult", -1.0), ("table_weight_decay", -1.0), ("muon_lr", 0.0),
                         ("muon_momentum", 1.0), ("warmup_steps", -1), ("schedule", "linear"),
                         ("min_lr_ratio", 1.5), ("step_decay_at", (0.9, 0.8)), ("step_decay_at", (0.0,)),
                         ("step_decay_factor", 0.0), ("grad_clip", -1.0)]:
        with pytest.raises(ValueError, match=field):
            OptimConfig(**{field: value})



def test_param_groups_cover_every_parameter_once_and_classify_by_role():
    model = small_lm()
    groups = param_groups(model)
    names = {group: {n for n, _ in named} for group, named in groups.items()}
    listed = [n for named in groups.values() for n, _ in named]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert names["tables"] == {"blocks.0.engram.multi_head_embedding.weight",
                               "blocks.2.engram.multi_head_embedding.weight"}
    for expert in ("w1", "w2", "w3"):
        assert f"blocks.1.ffn.{expert}" in names["matrices"]
    assert {"blocks.0.attn.q_proj.weight", "blocks.0.ffn.w2.weight", "blocks.2.ffn.shared.w1.weight",
            "blocks.0.engram.value_key_proj.weight"} <= names["matrices"]
    assert {"blocks.1.ffn.router.weight", "blocks.0.engram.short_conv.conv.weight"} <= names["decay"]
    assert {"embed.weight", "lm_head.weight", "blocks.0.attn_hc.phi", "blocks.0.attn_hc.alpha",
            "blocks.0.ffn_hc.bias", "merge.phi", "norm.weight", "blocks.0.engram.key_norm.weight",
            "blocks.0.engram.value_key_proj.bias"} <= names["no_decay"]
    assert all(p.dim() >= 2 for group in ("matrices", "decay") for _, p in groups[group])


def test_param_groups_see_through_wrappers():
    class Wrapper(nn.Module):  # like DDP's "module." or torch.compile's "_orig_mod." prefix
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = small_lm()
    plain = {group: [n for n, _ in named] for group, named in param_groups(model).items()}
    wrapped = {group: [n.removeprefix("module.") for n, _ in named]
               for group, named in param_groups(Wrapper(model)).items()}
    assert wrapped == plain


def test_muon_takes_exactly_the_matrices_and_adamw_the_rest():
    model = small_lm()
    opt = EngramOptimizer(model, OptimConfig(muon=True))
    groups = param_groups(model)
    muon = next(o for o in opt.optimizers if isinstance(o, Muon))
    adamw = next(o for o in opt.optimizers if isinstance(o, torch.optim.AdamW))
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(p) for _, p in groups["matrices"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert in_adamw == {id(p) for group in ("decay", "no_decay") for _, p in groups[group]}
    assert id(model.embed.weight) in in_adamw and id(model.lm_head.weight) in in_adamw
    assert len(EngramOptimizer(model, OptimConfig(muon=False)).optimizers) == 2



def test_tables_update_only_the_rows_read_at_five_times_the_lr():
    model = small_lm()
    cfg = OptimConfig(lr=1e-3, warmup_steps=0)
    opt = EngramOptimizer(model, cfg)
    table_opt = next(o for o in opt.optimizers if isinstance(o, torch.optim.SparseAdam))
    group = table_opt.param_groups[0]
    assert group["lr"] == pytest.approx(5 * cfg.lr) and group["weight_decay"] == 0.0
    before = {layer: t.weight.detach().clone() for layer, t in tables(model).items()}
    data = batches(3)
    train(model, opt, data)
    assert group["lr"] == pytest.approx(5 * opt.optimizers[0].param_groups[0]["lr"])  # multiplier kept by set_lr
    # The last position feeds no loss term, so a row read only there gets an all-zero gradient (no move).
    in_loss = read_rows(model, data, slice(0, -1))
    for layer, read in read_rows(model, data).items():
        after = tables(model)[layer].weight.detach()
        assert 0 < int(in_loss[layer].sum()) and int(read.sum()) < read.numel()
        assert torch.equal(after[~read], before[layer][~read])
        assert bool((after[in_loss[layer]] != before[layer][in_loss[layer]]).all())


def test_sparse_adam_sums_duplicate_rows_like_dense_adam():
    torch.manual_seed(0)

    class TableOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = MultiHeadEmbedding([7, 5], head_dim=3, sparse=True)

    model = TableOnly()
    dense = model.table.weight.detach().clone().requires_grad_(True)
    cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    opt = EngramOptimizer(model, cfg)
    reference = torch.optim.Adam([dense], lr=cfg.lr * cfg.table_lr_mult, betas=cfg.betas, eps=cfg.eps)
    ids = torch.tensor([[[1, 2], [1, 2], [3, 2], [1, 0]]])  # rows 1 and 7 + 2 read several times
    target = torch.randn(1, 4, 6)
    for _ in range(3):
        ((model.table(ids) - target) ** 2).sum().backward()
        grad = model.table.weight.grad
        assert grad.is_sparse and grad._indices().shape[1] > grad.coalesce()._indices().shape[1]
        opt.step()
        opt.zero_grad()
        flat = nn.functional.embedding(model.table.flat_row_ids(ids), dense).flatten(-2)
        ((flat - target) ** 2).sum().backward()
        reference.step()
        reference.zero_grad()
    torch.testing.assert_close(model.table.weight.detach(), dense.detach(), rtol=1e-5, atol=1e-6)


def test_table_weight_decay_shrinks_only_the_rows_read():
    data = batches(1)
    weights = []
    for decay in (0.0, 0.5):
        model = small_lm()
        opt = EngramOptimizer(model, OptimConfig(lr=1e-3, warmup_steps=0, table_weight_decay=decay))
        start = {layer: t.weight.detach().clone() for layer, t in tables(model).items()}
        train(model, opt, data)
        weights.append({layer: t.weight.detach() for layer, t in tables(model).items()})
    table_lr = 5e-3
    for layer, read in read_rows(model, data).items():
        assert torch.equal(weights[1][layer][~read], start[layer][~read])
        torch.testing.assert_close(weights[1][layer][read] - weights[0][layer][read],
                                   -table_lr * 0.5 * start[layer][read], rtol=1e-4, atol=1e-7)


def test_dense_table_gradient_raises_a_clear_error():
    model = small_lm(sparse=False)
    opt = EngramOptimizer(model, OptimConfig())
    ids = batches(1)[0]
    model(ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="dense gradient.*enable_sparse_tables"):
        opt.step()



def test_every_dense_parameter_updates():
    model = small_lm()
    opt = EngramOptimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0))
    groups = param_groups(model)
    dense = [(n, p) for group in ("matrices", "decay", "no_decay") for n, p in groups[group]]
    before = {n: p.detach().clone() for n, p in dense}
    train(model, opt, batches(3, length=16))
    unchanged = [n for n, p in dense if torch.equal(p.detach(), before[n])]
    assert unchanged == []


@pytest.mark.parametrize("muon", [False, True])
def test_weight_decay_acts_on_decay_groups_only(muon):
    model = small_lm()
    cfg = OptimConfig(lr=1e-2, muon_lr=0.03, weight_decay=0.3, warmup_steps=0, muon=muon)
    opt = EngramOptimizer(model, cfg)
    groups = param_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for group in ("matrices", "decay", "no_decay"):
        for _, p in groups[group]:
            p.grad = torch.zeros_like(p)  # Adam and Muon updates of a zero gradient are zero: only decay acts
    opt.step()
    for name, p in groups["no_decay"]:
        assert torch.equal(p.detach(), before[name]), name
    for name, p in groups["decay"]:
        torch.testing.assert_close(p.detach(), before[name] * (1 - cfg.lr * cfg.weight_decay))
    matrix_lr = cfg.muon_lr if muon else cfg.lr
    for name, p in groups["matrices"]:
        torch.testing.assert_close(p.detach(), before[name] * (1 - matrix_lr * cfg.weight_decay))


def test_clip_grad_norm_clips_dense_grads_and_leaves_tables_alone():
    model = small_lm()
    ids = batches(1)[0]
    for clip in (0.0, 1e-3):
        opt = EngramOptimizer(model, OptimConfig(grad_clip=clip))
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        dense = [p for n, p in model.named_parameters() if "multi_head_embedding" not in n]
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in dense]))
        table_grad = tables(model)[0].weight.grad.coalesce().values().clone()
        dense_grads = [p.grad.clone() for p in dense]
        norm = opt.clip_grad_norm()
        assert norm == pytest.approx(float(expected), rel=1e-5) and norm > 1e-3
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in dense]))
        if clip == 0.0:
            assert all(torch.equal(p.grad, g) for p, g in zip(dense, dense_grads))
        else:
            assert float(after) == pytest.approx(clip, rel=1e-4)
        assert torch.equal(tables(model)[0].weight.grad.coalesce().values(), table_grad)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())



def test_warmup_is_monotone_from_near_zero_to_the_peak():
    cfg = OptimConfig(lr=2e-3, warmup_steps=50)
    warm = [lr_at(s, 1000, cfg) for s in range(51)]
    assert 0 < warm[0] <= cfg.lr / 50 + 1e-12
    assert all(a < b for a, b in zip(warm[:50], warm[1:50]))
    assert warm[49] == pytest.approx(cfg.lr) and warm[50] == pytest.approx(cfg.lr)


def test_cosine_endpoints_and_midpoint():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(10, 110, cfg) == pytest.approx(1e-3)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55e-3)
    assert lr_at(110, 110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, 110, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_step_decay_and_constant():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="step", step_decay_at=(0.8, 0.9), step_decay_factor=0.316)
    assert lr_at(799, 1000, cfg) == 1.0
    assert lr_at(800, 1000, cfg) == pytest.approx(0.316)
    assert lr_at(899, 1000, cfg) == pytest.approx(0.316)
    assert lr_at(900, 1000, cfg) == pytest.approx(0.316 ** 2)
    constant = OptimConfig(lr=3e-3, warmup_steps=5, schedule="constant")
    assert [lr_at(s, 100, constant) for s in (5, 50, 100)] == [3e-3] * 3
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, 100, cfg)
    with pytest.raises(ValueError, match="max_steps"):
        lr_at(0, 0, cfg)


def test_set_lr_scales_every_group_by_the_schedule():
    model = small_lm()
    cfg = OptimConfig(lr=1e-3, muon=True, muon_lr=0.02, warmup_steps=10)
    opt = EngramOptimizer(model, cfg)
    lr = opt.set_lr(3, 100)
    assert lr == pytest.approx(lr_at(3, 100, cfg)) and lr == pytest.approx(4e-4)
    for inner in opt.optimizers:
        for group in inner.param_groups:
            assert group["lr"] == pytest.approx(group["base_lr"] * 0.4)
    assert sorted({g["base_lr"] for o in opt.optimizers for g in o.param_groups}) == pytest.approx([1e-3, 5e-3, 0.02])



def test_resume_from_state_dict_is_bit_identical():
    cfg = OptimConfig(lr=2e-3, muon=True, warmup_steps=2, table_weight_decay=0.1)
    data = batches(6)
    model = small_lm()
    opt = EngramOptimizer(model, cfg)
    train(model, opt, data[:3])

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = small_lm(seed=123)
    resumed.load_state_dict(saved["model"])
    resumed_opt = EngramOptimizer(resumed, cfg)
    resumed_opt.load_state_dict(saved["optim"])

    train(model, opt, data[3:], start=3)
    train(resumed, resumed_opt, data[3:], start=3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_loading_another_layout_raises():
    opt = EngramOptimizer(small_lm(), OptimConfig())
    state = opt.state_dict()
    with pytest.raises(ValueError, match="matrices"):
        EngramOptimizer(small_lm(dense_ffn_dim=40), OptimConfig()).load_state_dict(state)
    with pytest.raises(ValueError, match="tables"):
        one_table = EngramConfig(engram_vocab_size=[311, 313], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0])
        EngramOptimizer(small_lm(engram=one_table), OptimConfig()).load_state_dict(state)
    with pytest.raises(ValueError, match="muon"):
        EngramOptimizer(small_lm(), OptimConfig(muon=True)).load_state_dict(state)
    with pytest.raises(ValueError, match="EngramOptimizer state dict"):
        opt.load_state_dict(state["optimizers"]["adamw"])



@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (48, 48)])
def test_newton_schulz_orthogonalises_and_matches_the_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    # Well-conditioned input (singular values in [1, 4]) so every singular value reaches NS's band.
    u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=gen), full_matrices=False)
    g = u @ torch.diag(torch.linspace(1, 4, min(shape))) @ vh
    out = newton_schulz(g)
    assert out.dtype == g.dtype and out.shape == g.shape
    sv = torch.linalg.svdvals(out)
    assert bool(((sv > 0.5) & (sv < 1.5)).all()), sv
    ref = reference_newton_schulz(g)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.06  # bf16 rounding over 5 iterations
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float64), ref.to(g.dtype), rtol=0, atol=1e-5)


def test_newton_schulz_handles_random_rectangular_matrices():
    out = newton_schulz(torch.randn(32, 128, generator=torch.Generator().manual_seed(3)))
    sv = torch.linalg.svdvals(out)
    assert bool(((sv > 0.5) & (sv < 1.5)).all()), sv


def test_expert_tensors_are_orthogonalised_per_expert():
    experts = torch.randn(4, 16, 40, generator=torch.Generator().manual_seed(5))
    experts[1] *= 100.0  # per-expert normalisation: one expert's scale must not leak into the others
    batched = newton_schulz(experts, dtype=torch.float64)
    for e in range(4):
        torch.testing.assert_close(batched[e], newton_schulz(experts[e], dtype=torch.float64), rtol=0, atol=1e-6)
        sv = torch.linalg.svdvals(newton_schulz(experts)[e])
        assert bool(((sv > 0.5) & (sv < 1.5)).all()), (e, sv)


def test_muon_update_has_adamw_like_rms_and_decoupled_decay():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(5, 24, 96))
    start = weight.detach().clone()
    weight.grad = torch.randn_like(weight)
    lr, decay = 0.01, 0.1
    Muon([weight], lr=lr, momentum=0.95, weight_decay=decay).step()
    step = weight.detach() - start * (1 - lr * decay)
    expected = -lr * muon_scale(weight.shape) * newton_schulz(weight.grad * 1.95)
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    rms = float(step.pow(2).mean().sqrt())
    assert 0.1 * lr < rms < 0.25 * lr
    with pytest.raises(ValueError, match="shape"):
        Muon([nn.Parameter(torch.zeros(3))])


def test_muon_decreases_loss_on_a_small_regression():
    torch.manual_seed(0)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(16, 64, bias=False), nn.Linear(64, 4, bias=False)])

        def forward(self, x):
            return self.blocks[1](torch.relu(self.blocks[0](x)))

    model = MLP()
    x = torch.randn(256, 16)
    y = torch.tanh(x @ torch.randn(16, 4))
    opt = EngramOptimizer(model, OptimConfig(muon=True, muon_lr=0.02, weight_decay=0.0, warmup_steps=0))
    assert [type(o) for o in opt.optimizers] == [Muon]
    losses = []
    for step in range(30):
        opt.set_lr(step, 30)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_muon_training_of_the_lm_decreases_loss():
    model = small_lm()
    opt = EngramOptimizer(model, OptimConfig(muon=True, lr=3e-3, warmup_steps=0))
    ids = batches(1)[0]
    losses = train(model, opt, [ids] * 5, max_steps=5)
    assert losses[-1] < losses[0] - 0.5
    assert not math.isnan(losses[-1])
