"""The training forward + backward of a whole EngramLM compiles as one graph, once, whatever the batch holds."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from engram.model import EngramLM, EngramLMConfig


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    cfg = EngramLMConfig.from_preset("tiny", max_position_embeddings=64)
    return EngramLM(cfg).train()


def _loss(model, ids, targets):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the grouped-GEMM MoE compiles in bf16 (as on CUDA)
        return model(ids, targets=targets).loss


def test_training_step_compiles_once_without_graph_breaks(tiny_model):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_loss, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    generator = torch.Generator().manual_seed(1)
    for step in range(3):  # fresh ids each step: other routings, other Engram rows
        ids = torch.randint(3, 128815, (2, 24), generator=generator)
        targets = torch.randint(3, 128815, (2, 24), generator=generator)
        loss = compiled(tiny_model, ids, targets)
        loss.backward()
        eager = _loss(tiny_model, ids, targets)
        torch.testing.assert_close(loss, eager, rtol=1e-3, atol=1e-3)
        tiny_model.zero_grad(set_to_none=True)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times in 3 steps (recompiles)"


def test_compiled_caller_checks_ids_on_the_host(tiny_model):
    """Inside the graph the id range check is skipped; the public check still refuses out-of-range ids."""
    bad = torch.tensor([[3, 10**6]])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        tiny_model.check_input_ids(bad)


def test_sparse_tables_read_outside_the_graph():
    """With sparse-gradient tables (sparse Adam training) the table reads run eagerly before the compiled blocks:
    one break there (inductor cannot build a sparse gradient), no recompiles, and the same sparse table
    gradients as eager (in fp32, so dense FFNs: under bf16 autocast compiled and eager differ by rounding, dense
    tables too, and in fp32 the compiled MoE takes its per-expert loop)."""
    from engram.train.optim import enable_sparse_tables

    torch.manual_seed(0)
    cfg = EngramLMConfig.from_preset("tiny", max_position_embeddings=64)
    tiny_model = EngramLM(EngramLMConfig.from_preset("tiny", max_position_embeddings=64, moe=None,
                                                     ffn_kinds=["dense"] * cfg.n_layers)).train()
    enable_sparse_tables(tiny_model)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def fp32_loss(model, ids, targets):
        return model(ids, targets=targets).loss

    compiled = torch.compile(fp32_loss, backend=counter)
    generator = torch.Generator().manual_seed(2)
    table = next(p for n, p in tiny_model.named_parameters() if "multi_head_embedding" in n)
    for _ in range(2):
        ids = torch.randint(3, 128815, (2, 24), generator=generator)
        targets = torch.randint(3, 128815, (2, 24), generator=generator)
        compiled(tiny_model, ids, targets).backward()
        compiled_grad = table.grad.coalesce()
        tiny_model.zero_grad(set_to_none=True)
        fp32_loss(tiny_model, ids, targets).backward()
        eager_grad = table.grad.coalesce()
        tiny_model.zero_grad(set_to_none=True)
        assert compiled_grad.is_sparse
        torch.testing.assert_close(compiled_grad.indices(), eager_grad.indices())
        error = (compiled_grad.values() - eager_grad.values()).norm() / eager_grad.values().norm()
        assert error < 1e-4, f"sparse table gradient differs from eager by {error:.3g} (relative norm)"
    assert counter.frame_count == 2, f"{counter.frame_count} graphs (expected the blocks' and the prefix's)"
