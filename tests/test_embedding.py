import threading

import pytest
import torch

from engram import MultiHeadEmbedding
from engram.embedding import table_views


def test_rows_come_from_each_heads_slice():
    torch.manual_seed(0)
    emb = MultiHeadEmbedding([5, 7, 3], head_dim=4)
    ids = torch.stack([torch.randint(0, n, (2, 9)) for n in (5, 7, 3)], dim=-1)
    out = emb(ids)
    assert out.shape == (2, 9, 12)
    starts = [0, 5, 12]
    for head in range(3):
        expected = emb.weight[ids[..., head] + starts[head]]
        torch.testing.assert_close(out[..., head * 4:(head + 1) * 4], expected, rtol=0, atol=0)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_only_read_rows_get_gradient(sparse):
    emb = MultiHeadEmbedding([11, 13], head_dim=3, sparse=sparse)
    ids = torch.tensor([[[1, 2], [4, 2]]])
    (emb(ids) * torch.randn(1, 2, 6)).sum().backward()
    grad = emb.weight.grad
    assert grad.is_sparse == sparse
    dense = grad.to_dense() if sparse else grad
    touched = dense.abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [1, 4, 13]  # head 1's row 2 lives at offset 11 + 2


def test_errors():
    with pytest.raises(ValueError, match=r"table_sizes must be .* got \[\]"):
        MultiHeadEmbedding([], head_dim=4)
    with pytest.raises(ValueError, match="head_dim must be >= 1, got 0"):
        MultiHeadEmbedding([3], head_dim=0)
    with pytest.raises(ValueError, match=r"row_ids must end in 2 heads, got shape \(1, 3\)"):
        MultiHeadEmbedding([3, 3], head_dim=2)(torch.zeros(1, 3, dtype=torch.long))


def test_table_views_show_reads_in_this_thread_inside_the_block_only():
    emb = MultiHeadEmbedding([5, 7], head_dim=2)
    other = MultiHeadEmbedding([5, 7], head_dim=2)
    ids = torch.tensor([[[1, 3], [4, 0]]])
    base, other_base = emb(ids), other(ids)
    seen = []

    def negate(flat_rows, pending):
        seen.append(flat_rows.tolist())
        return pending.then(torch.neg)

    def double(flat_rows, pending):
        return pending.then(lambda rows: 2 * rows)

    in_thread = []
    with table_views({emb: negate}):
        assert torch.equal(emb(ids), -base) and torch.equal(other(ids), other_base)  # only the viewed table
        assert seen == [[[[1, 8], [4, 5]]]]  # the view gets the flat row ids (head offsets added)
        with table_views({emb: double}):
            assert torch.equal(emb(ids), 2 * base)  # the inner view replaces the outer one
        assert torch.equal(emb(ids), -base)
        thread = threading.Thread(target=lambda: in_thread.append(emb(ids)))
        thread.start()
        thread.join()
    assert torch.equal(in_thread[0], base)  # another thread reads the table as it is
    assert torch.equal(emb(ids), base)
    with pytest.raises(RuntimeError, match="inside"):
        with table_views({emb: negate}):
            raise RuntimeError("inside")
    assert torch.equal(emb(ids), base)  # gone after a block that raised too
