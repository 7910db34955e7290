"""Row-sharded Engram tables against the single-process MultiHeadEmbedding (the reference), over gloo processes.

Each scenario runs once per rank in spawned processes that save their results; the parent builds the same
tables with the same seed in one process and compares.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engram import EngramConfig, MultiHeadEmbedding
from engram.model import EngramLM, EngramLMConfig
from engram.model.config import MoEConfig
from engram.parallel import ShardedMultiHeadEmbedding, finish_distributed, shard_engram_tables
from engram.parallel.sharded_embedding import RowShard, row_shard

HEAD_DIM = 4
# World 2, R = 33, block 17: flat rows 0..16 (head 0, head 1 and head 2's row 0) live on rank 0.
SIZES_2 = [13, 3, 17]
# World 3: R = 7 gives shards of 3, 3, 1 rows; R = 4 gives 2, 2, 0.
SIZES_3 = {"tiny": [4, 3], "empty": [3, 1]}
LR = 0.1


def small_lm_config() -> EngramLMConfig:
    """tests/model/lm_helpers.small_config() (tests/model is not a package)."""
    return EngramLMConfig(
        vocab_size=129280, tokenizer_vocab_size=128815, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=8, max_position_embeddings=64, ffn_kinds=["dense", "moe", "moe"], dense_ffn_dim=48,
        moe=MoEConfig(num_experts=5, num_shared_experts=1, top_k=2, expert_dim=24), hc_mult=4,
        hc_sinkhorn_iters=20,
        engram=EngramConfig(engram_vocab_size=[311, 313], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[0, 2]),
        engram_conv_zero_init=False, tie_embeddings=True, init_std=0.1,
    )


def make_table(sizes: list[int], sparse: bool, dtype: torch.dtype = torch.float32) -> MultiHeadEmbedding:
    torch.manual_seed(0)
    return MultiHeadEmbedding(sizes, HEAD_DIM, sparse=sparse).to(dtype)


def make_lm() -> EngramLM:
    torch.manual_seed(0)
    return EngramLM(small_lm_config()).eval()


def rank_row_ids(sizes: list[int], rank: int, tokens: int) -> torch.Tensor:
    """``[2, tokens // 2, H]`` ids with repeats, different per rank; world 2's rank 1 reads rank 0's rows only."""
    gen = torch.Generator().manual_seed(100 + rank)
    highs = [1 if (rank == 1 and sizes == SIZES_2 and head == 2) else n for head, n in enumerate(sizes)]
    return torch.stack([torch.randint(0, n, (2, tokens // 2), generator=gen) for n in highs], dim=-1)


def upstream_grad(rows: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A fresh ``[B, T, H * D]`` gradient for ``rows`` ``[B, T, H]``."""
    gen = torch.Generator().manual_seed(200 + rank)
    return torch.randn(*rows.shape[:-1], rows.shape[-1] * HEAD_DIM, generator=gen).to(dtype)


def rank_tokens(world: int, rank: int) -> int:
    return 0 if (world == 3 and rank == 1) else 12  # world 3's rank 1 has an empty batch


def lm_input_ids(rank: int) -> torch.Tensor:
    return torch.randint(3, 128_815, (2 + rank, 9), generator=torch.Generator().manual_seed(300 + rank))


def sharded_lookup(table: MultiHeadEmbedding, rows: torch.Tensor, rank: int, dedup: bool) -> dict:
    """Forward, backward and one SparseAdam step (sparse tables) of this rank's rows; what the parent compares."""
    sharded = ShardedMultiHeadEmbedding.from_embedding(table, dedup=dedup)
    out = sharded(rows)
    traffic = dict(sharded.traffic)
    (out.float() * upstream_grad(rows, rank)).sum().backward()
    backward_bytes = sharded.traffic["bytes_sent"] - traffic["bytes_sent"]
    with torch.no_grad():
        eval_out = sharded(rows)
    grad = sharded.weight.grad
    result = dict(out=out.detach(), eval_out=eval_out, traffic=traffic, backward_bytes=backward_bytes,
                  table=sharded.table(), start=sharded.shard.start, sparse=grad.is_sparse,
                  grad=grad.to_dense(), grad_rows=grad.coalesce().indices()[0] if grad.is_sparse else None)
    if table.sparse:
        torch.optim.SparseAdam([sharded.weight], lr=LR).step()
        result["stepped"] = sharded.weight.detach().clone()
    return result


def scenario_world2(rank: int, world: int) -> dict:
    rows = rank_row_ids(SIZES_2, rank, rank_tokens(world, rank))
    results = {f"dedup={dedup}": sharded_lookup(make_table(SIZES_2, sparse=dedup), rows, rank, dedup)
               for dedup in (True, False)}
    bf16 = ShardedMultiHeadEmbedding.from_embedding(make_table(SIZES_2, sparse=True, dtype=torch.bfloat16))
    results["bf16"] = bf16(rows).detach()

    model = make_lm()
    names = [name for name, _ in model.named_parameters()]
    results["lm_tables_sharded"] = shard_engram_tables(model)
    results["lm_names_kept"] = [name for name, _ in model.named_parameters()] == names
    results["lm_placements"] = [b.engram.multi_head_embedding.placement for b in model.blocks if b.engram]
    with torch.no_grad():
        results["lm_logits"] = model(lm_input_ids(rank)).logits

    torch.manual_seed(rank)  # the ranks draw different rows
    meta = EngramLM(small_lm_config(), table_device="meta").eval()
    results["meta_tables_sharded"] = shard_engram_tables(meta, device="cpu")
    results["meta_left"] = [name for name, p in meta.named_parameters() if p.is_meta]
    results["meta_shards"] = [b.engram.multi_head_embedding.weight.detach().clone() for b in meta.blocks if b.engram]
    results["meta_tables"] = [b.engram.multi_head_embedding.table() for b in meta.blocks if b.engram]
    with torch.no_grad():
        results["meta_logits"] = meta(lm_input_ids(rank)).logits
    return results


def scenario_world3(rank: int, world: int) -> dict:
    results = {}
    for name, sizes in SIZES_3.items():
        rows = rank_row_ids(sizes, rank, rank_tokens(world, rank))
        results[name] = sharded_lookup(make_table(sizes, sparse=True), rows, rank, dedup=True)
    return results


SCENARIOS = {"world2": scenario_world2, "world3": scenario_world3}


def _worker(rank: int, world: int, init_file: str, out_dir: str, scenario: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    torch.save(SCENARIOS[scenario](rank, world), f"{out_dir}/rank{rank}.pt")
    finish_distributed()


def run_ranks(tmp_path, world: int, scenario: str) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path), scenario), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def reference(sizes: list[int], world: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The single-process table, its summed (coalesced) gradient, each rank's output, and the table after
    SparseAdam on that gradient (the single-process loss is the sum of the ranks' losses)."""
    table = make_table(sizes, sparse=True)
    initial = table.weight.detach().clone()
    outs = []
    for rank in range(world):
        rows = rank_row_ids(sizes, rank, rank_tokens(world, rank))
        out = table(rows)
        (out * upstream_grad(rows, rank)).sum().backward()
        outs.append(out.detach())
    table.weight.grad = table.weight.grad.coalesce()
    grad = table.weight.grad
    torch.optim.SparseAdam([table.weight], lr=LR).step()
    return initial, grad, outs, table.weight.detach()


def expected_traffic(sizes: list[int], world: int, rank: int, dedup: bool) -> dict:
    """Counters of one lookup and its backward, worked out from every rank's rows."""
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    flat = [(rank_row_ids(sizes, r, rank_tokens(world, r)) + offsets).flatten() for r in range(world)]
    distinct = [f.unique() if dedup else f for f in flat]
    shard = row_shard(sum(sizes), rank, world)
    served = sum(int(((d >= shard.start) & (d < shard.end)).sum()) for d in distinct)
    sent = distinct[rank].numel()
    row_bytes = HEAD_DIM * 4
    return dict(forward=dict(rows_requested=flat[rank].numel(), rows_sent=sent, calls=1,
                             bytes_sent=sent * 8 + served * row_bytes),
                backward=sent * row_bytes)


def check_lookup(results: list[dict], key: str, sizes: list[int], dedup: bool) -> None:
    world = len(results)
    initial, grad, outs, stepped = reference(sizes, world)
    grad_dense = grad.to_dense()
    for rank, result in enumerate(results):
        got = result[key]
        shard = row_shard(sum(sizes), rank, world)
        torch.testing.assert_close(got["out"], outs[rank], rtol=0, atol=0)
        torch.testing.assert_close(got["eval_out"], outs[rank], rtol=0, atol=0)
        torch.testing.assert_close(got["table"], initial, rtol=0, atol=0)
        torch.testing.assert_close(got["grad"], grad_dense[shard.start:shard.end], rtol=1e-6, atol=1e-6)
        if got["sparse"]:
            in_shard = (grad.indices()[0] >= shard.start) & (grad.indices()[0] < shard.end)
            assert got["grad_rows"].tolist() == (grad.indices()[0][in_shard] - shard.start).tolist()
            torch.testing.assert_close(got["stepped"], stepped[shard.start:shard.end], rtol=1e-6, atol=1e-6)
        traffic = expected_traffic(sizes, world, rank, dedup)
        assert got["traffic"] == traffic["forward"]
        assert got["backward_bytes"] == traffic["backward"]
    assert torch.cat([r[key]["grad"] for r in results]).shape == grad_dense.shape


def test_world2_matches_single_process_table_and_lm(tmp_path):
    model = make_lm()  # first, so that the ranks find the tokenizer's lookup table cached
    results = run_ranks(tmp_path, 2, "world2")
    check_lookup(results, "dedup=True", SIZES_2, dedup=True)
    check_lookup(results, "dedup=False", SIZES_2, dedup=False)
    assert [r["dedup=True"]["sparse"] for r in results] == [True, True]
    assert [r["dedup=False"]["sparse"] for r in results] == [False, False]  # copied from the dense-grad table
    for r in results:
        assert r["dedup=True"]["traffic"]["rows_sent"] < r["dedup=True"]["traffic"]["rows_requested"]
    assert rank_row_ids(SIZES_2, 1, 12)[..., 2].eq(0).all()  # rank 1 reads rows of rank 0 only

    bf16_table = make_table(SIZES_2, sparse=True, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: matmul sums in the same order
    try:
        for rank, r in enumerate(results):
            torch.testing.assert_close(r["bf16"], bf16_table(rank_row_ids(SIZES_2, rank, 12)).detach(),
                                       rtol=0, atol=0)
            assert r["lm_tables_sharded"] == 2
            assert r["lm_names_kept"]
            assert r["lm_placements"] == ["sharded", "sharded"]
            with torch.no_grad():
                torch.testing.assert_close(r["lm_logits"], model(lm_input_ids(rank)).logits, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    check_meta_built(results, [b.engram.multi_head_embedding.num_rows for b in model.blocks if b.engram])


def check_meta_built(results: list[dict], sizes: list[int]) -> None:
    """A model built with table_device="meta" and sharded: each rank drew its own rows, nothing left on meta."""
    for r in results:
        assert r["meta_tables_sharded"] == 2
        assert r["meta_left"] == []
        assert torch.isfinite(r["meta_logits"]).all()
    for layer, rows in enumerate(sizes):
        shards = [r["meta_shards"][layer] for r in results]
        assert [s.shape[0] for s in shards] == [-(-rows // 2), rows - -(-rows // 2)]
        assert not torch.equal(shards[0][:5], shards[1][:5])  # each rank drew its own rows
        whole = torch.cat(shards)
        for r in results:  # the exchange assembles the same table on both ranks
            torch.testing.assert_close(r["meta_tables"][layer], whole, rtol=0, atol=0)
        assert 0.8 < float(whole.std()) < 1.2  # N(0, init_std = 1)


def test_world3_uneven_shards_and_an_empty_batch(tmp_path):
    results = run_ranks(tmp_path, 3, "world3")
    assert [r["tiny"]["grad"].shape[0] for r in results] == [3, 3, 1]
    assert [r["empty"]["grad"].shape[0] for r in results] == [2, 2, 0]
    assert results[1]["tiny"]["out"].shape == (2, 0, 4 * 2)
    for name, sizes in SIZES_3.items():
        check_lookup(results, name, sizes, dedup=True)


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="torchrun.*init_process_group"):
        ShardedMultiHeadEmbedding([5, 7], head_dim=HEAD_DIM)
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_engram_tables(torch.nn.ModuleDict({"multi_head_embedding": MultiHeadEmbedding([5], 2)}))


@pytest.mark.parametrize(
    "num_rows, world_size, bounds",
    [(10, 1, [(0, 10)]), (10, 2, [(0, 5), (5, 10)]), (7, 3, [(0, 3), (3, 6), (6, 7)]),
     (4, 3, [(0, 2), (2, 4), (4, 4)]), (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)])],
    ids=["single", "even", "uneven", "empty-last", "more-ranks-than-rows"])
def test_row_shard_blocks_cover_every_row_once(num_rows, world_size, bounds):
    shards = [row_shard(num_rows, rank, world_size) for rank in range(world_size)]
    assert [(s.start, s.end) for s in shards] == bounds
    assert sum(s.size for s in shards) == num_rows
    rows = torch.arange(num_rows)
    owners = shards[0].owner(rows)
    for rank, shard in enumerate(shards):
        assert owners[shard.start:shard.end].eq(rank).all()


def test_row_shard_errors():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        row_shard(10, 0, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        row_shard(10, 2, 2)
    with pytest.raises(ValueError, match="rank must be .* got -1"):
        row_shard(10, -1, 2)
    with pytest.raises(ValueError, match="num_rows must be >= 1, got 0"):
        RowShard(0, 0, 1)


def test_fp8_tables_are_not_sharded():
    fp8 = MultiHeadEmbedding([5, 7], head_dim=32, row_format="fp8")
    with pytest.raises(ValueError, match="FP8 tables are read-only.*sharding a table for training"):
        ShardedMultiHeadEmbedding.from_embedding(fp8)
