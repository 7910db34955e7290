"""The controls of the allocation sweep (variants ``no-memory`` and ``conv-only``): one-row tables that every n-gram
hashes to, the no-memory layer against the demo layer fed its learned vector, the conv-only layer against the plain
ShortConv, cached decoding, and demo configs left as they were."""

import dataclasses
import json

import pytest
import torch

from engram import Engram, EngramConfig, NgramHasher
from engram.config import DEMO_ABLATIONS, VARIANTS, table_sizes_for
from engram.kernels.shortconv.naive import short_conv_naive
from engram.model import EngramLM, EngramLMConfig

DEMO = EngramConfig(engram_vocab_size=[211, 307], n_embed_per_ngram=24, n_head_per_ngram=3, layer_ids=[2, 5])


def control(variant: str) -> EngramConfig:
    return dataclasses.replace(DEMO, variant=variant)


def random_ids(batch, length, seed=0):
    return torch.randint(0, 128_815, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", DEMO_ABLATIONS)
@pytest.mark.parametrize("force", [False, True], ids=["torch", "triton"])
def test_every_ngram_hashes_to_the_one_row_of_its_head(deepseek_ct, variant, force):
    cfg = control(variant)
    assert table_sizes_for(cfg) == {2: [[1, 1, 1], [1, 1, 1]], 5: [[1, 1, 1], [1, 1, 1]]}
    hasher = NgramHasher(cfg, tokenizer=deepseek_ct)
    ids = random_ids(3, 40)
    ids[0, :5] = 128_814  # the largest id: the largest mixes
    if force and torch.cuda.is_available():  # force=True: the Triton kernel (interpreted on a CPU)
        ids = ids.cuda()
    for layer_id, rows in hasher.hash_all(ids, force=force).items():
        assert rows.shape == (3, 40, 6) and not rows.any(), layer_id
    assert hasher.fingerprint()["variant"] == variant  # a control's tables never load into a demo model


def test_no_memory_layer_is_the_demo_layer_reading_one_learned_vector(deepseek_ct):
    """Reference twin: the demo layer given its learned vector as the memory of every position."""
    torch.manual_seed(0)
    layer = Engram(control("no-memory"), 5, 16, 4, hasher=NgramHasher(control("no-memory"), tokenizer=deepseek_ct))
    reference = Engram(DEMO, 5, 16, 4, hasher=NgramHasher(DEMO, tokenizer=deepseek_ct))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    shared = {k: v for k, v in layer.state_dict().items() if k.split(".")[0] not in ("multi_head_embedding",
                                                                                     "memory_constant")}
    reference.load_state_dict(shared, strict=False)
    ids, hidden, weights = random_ids(2, 9, seed=1), torch.randn(2, 9, 4, 16), torch.randn(2, 9, 4, 16)

    out, gates = layer(hidden, input_ids=ids, return_gates=True)
    (out * weights).sum().backward()
    memory = layer.memory_constant.weight.detach()[0].expand(2, 9, -1).clone().requires_grad_()
    expected, expected_gates = reference(hidden, memory=memory, return_gates=True)
    (expected * weights).sum().backward()

    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gates, expected_gates)
    assert torch.unique(gates).numel() > 1  # the gate still reads the hidden state
    torch.testing.assert_close(layer.memory_constant.weight.grad[0], memory.grad.sum((0, 1)))
    for name, p in reference.named_parameters():
        if name in shared:
            torch.testing.assert_close(dict(layer.named_parameters())[name].grad, p.grad, msg=name)
    assert layer.multi_head_embedding.weight.grad is None  # its one-row tables are not read
    other = random_ids(2, 9, seed=3)
    torch.testing.assert_close(layer(hidden, input_ids=other), out.detach())  # whatever the tokens


def test_conv_only_layer_is_the_short_conv_of_the_hidden_state(deepseek_ct):
    cfg = control("conv-only")
    torch.manual_seed(0)
    layer = Engram(cfg, 2, 16, 4, hasher=NgramHasher(cfg, tokenizer=deepseek_ct))
    with torch.no_grad():
        layer.short_conv.conv.weight.normal_()
        layer.short_conv.norm.weight.uniform_(0.5, 1.5)
    hidden = torch.randn(2, 11, 4, 16)
    expected, _ = short_conv_naive(hidden, layer.short_conv.norm.weight, layer.short_conv.conv.weight,
                                   cfg.max_ngram_size, layer.short_conv.norm.eps)
    torch.testing.assert_close(layer(hidden, input_ids=random_ids(2, 11)), expected)
    assert layer.value_key_proj is None
    assert layer.key_norm.weight.numel() == layer.query_norm.weight.numel() == 0  # no gate
    conv_params = sum(p.numel() for p in layer.short_conv.parameters())
    assert sum(p.numel() for p in layer.parameters()) == conv_params + cfg.num_heads * cfg.head_dim  # + 1-row tables
    with pytest.raises(ValueError, match="variant 'conv-only' has no gate"):
        layer(hidden, input_ids=random_ids(2, 11), return_gates=True)


@pytest.mark.parametrize("variant", DEMO_ABLATIONS)
def test_controls_decode_like_a_full_forward_and_survive_a_save(variant, tmp_path):
    base = EngramLMConfig.from_preset("tiny", max_position_embeddings=32)
    cfg = dataclasses.replace(base, engram=dataclasses.replace(base.engram, variant=variant),
                              engram_conv_zero_init=False)  # a live convolution
    torch.manual_seed(0)
    model = EngramLM(cfg).eval()
    ids = random_ids(2, 12, seed=2)
    greedy = ids[:, :5]
    with torch.no_grad():
        for _ in range(7):  # greedy decoding by full forwards: the plain twin of the cached generate
            greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        full = model(ids).logits
    assert torch.equal(model.generate(ids[:, :5], max_new_tokens=7, temperature=0), greedy)
    model.save_pretrained(tmp_path / "model")
    loaded = EngramLM.from_pretrained(tmp_path / "model").eval()
    assert loaded.cfg.engram.variant == variant
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, full)


def test_demo_configs_keep_their_saved_form():
    """Saved configs (and the model fingerprints hashed from them) of the demo layer are unchanged: the controls
    are variants, not a new field."""
    saved = EngramLMConfig.from_preset("small").to_dict()["engram"]
    assert saved["variant"] == "demo" and "ablation" not in json.dumps(saved)
    assert VARIANTS["demo"].ablation is None and VARIANTS["deepseek-v4.1"].ablation is None
    assert {VARIANTS[name].ablation for name in DEMO_ABLATIONS} == set(DEMO_ABLATIONS)
    with pytest.raises(ValueError, match="EngramLM builds the demo variant's layers"):
        EngramLMConfig.from_preset("small", engram={**saved, "variant": "deepseek-v4.1"})


@pytest.mark.slow
@pytest.mark.parametrize("variant", DEMO_ABLATIONS)
def test_controls_train_compiled_with_sparse_tables(variant):
    """The training step of ``engram sweep`` (sparse-gradient tables, compiled): the same loss and gradients as
    eager, and no graph break the demo layer does not have. On CUDA through inductor (the GPU runs' path), elsewhere
    through aot_eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from engram.train.optim import enable_sparse_tables

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = EngramLMConfig.from_preset("tiny", max_position_embeddings=32)

    def model_of(variant):
        torch.manual_seed(0)
        cfg = dataclasses.replace(base, engram=dataclasses.replace(base.engram, variant=variant))
        model = EngramLM(cfg).to(device)
        enable_sparse_tables(model)
        return model

    def loss_of(model, ids, targets):
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(ids, targets=targets).loss

    ids, targets = random_ids(2, 24, seed=4).to(device), random_ids(2, 24, seed=5).to(device)
    torch._dynamo.reset()
    demo_graphs = torch._dynamo.explain(loss_of)(model_of("demo"), ids, targets).graph_count
    model = model_of(variant)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")
    compiled = torch.compile(loss_of, backend=counter)
    loss = compiled(model, ids, targets)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager_loss = loss_of(model, ids, targets)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    eager = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager.keys() and not any("multi_head_embedding" in name for name in grads)
    for name in ("blocks.1.engram.short_conv.conv.weight", "blocks.1.engram.memory_constant.weight"):
        if name in eager:  # bf16 autocast: compiled and eager round differently
            error = (grads[name] - eager[name]).norm() / eager[name].norm()
            assert error < 0.02, f"{name}: compiled gradient differs from eager by {error:.3g} (relative norm)"
    assert counter.frame_count == demo_graphs  # the table reads outside the graph, as for the demo layer
