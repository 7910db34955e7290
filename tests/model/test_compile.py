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
