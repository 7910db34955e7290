"""engram.hf.injection and engram.hf.evaluate on a tiny random Llama (no hub): Engram and peft LoRA adapters train
through the same loop, leave the base untouched, and the measurements agree with their plain definitions."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

pytest.importorskip("peft")

from engram import EngramConfig  # noqa: E402
from engram.data.batches import TokenBatches, validation_batches  # noqa: E402
from engram.hf.evaluate import exact_match, generation_throughput, held_out_loss  # noqa: E402
from engram.hf.export import to_engram_lm  # noqa: E402
from engram.hf.injection import EngramInjection, LoraInjection, train_adapter, trainable_parameters  # noqa: E402
from engram.train.optim import OptimConfig  # noqa: E402

VOCAB = 40
ENGRAM = EngramConfig(engram_vocab_size=[97, 101], n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=[1], pad_id=0)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({"<pad>": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)).eval()


def _batches() -> TokenBatches:
    tokens = np.random.default_rng(0).integers(1, VOCAB, 2000).astype(np.uint32)
    return TokenBatches(tokens, 4, 16, seed=0)


@pytest.mark.parametrize("method", [EngramInjection([1], ENGRAM), LoraInjection(4)], ids=lambda m: m.name)
def test_adapters_train_through_one_loop_and_leave_the_base(method, tokenizer, tmp_path):
    base = _base()
    model = method.attach(_base(), tokenizer)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_adapter(model, _batches(), 12, OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=1),
                           torch.device("cpu"))
    assert len(losses) == 12 and losses[-1] < losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)
    folder = method.save(model, tmp_path / method.name)
    assert any(p.suffix == ".safetensors" for p in folder.iterdir())


def test_lora_parameters_grow_linearly_with_the_rank(tokenizer):
    per_rank = trainable_parameters(LoraInjection(1).attach(_base(), tokenizer))
    # every linear layer of a block: q, k, v, o (32 -> 32, 32 -> 16 twice, 32 -> 32), gate, up, down (32 <-> 64)
    assert per_rank == 2 * (64 + 48 + 48 + 64 + 3 * 96)
    assert trainable_parameters(LoraInjection(5).attach(_base(), tokenizer)) == 5 * per_rank
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraInjection(0)


def _greedy_reference(model, prompt: list[int], completion: list[int]) -> bool:
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=len(completion), min_new_tokens=len(completion),
                         pad_token_id=0)
    return out[0, len(prompt):].tolist() == completion


@pytest.mark.parametrize("method", [None, EngramInjection([1], ENGRAM)], ids=["base", "engram"])
def test_exact_match_is_greedy_generation(method, tokenizer):
    model = _base()
    if method is not None:
        model = method.attach(model, tokenizer)
        with torch.no_grad():
            for p in model.engram_retrofit.parameters():
                p.add_(torch.randn_like(p))
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, VOCAB, rng.integers(1, 9)).tolist() for _ in range(12)]
    completions = []
    for i, prompt in enumerate(prompts):  # half the rows: what greedy decoding gives; half: a random guess
        out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=3, min_new_tokens=3,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        completions.append(out[0, len(prompt):].tolist() if i % 2 else rng.integers(1, VOCAB, 3).tolist())
    got = exact_match(model, prompts, completions, torch.device("cpu"), batch_size=5)
    expected = [_greedy_reference(model, p, c) for p, c in zip(prompts, completions)]
    assert got.tolist() == expected and sum(expected) >= 6


def test_exact_match_refuses_mismatched_input():
    with pytest.raises(ValueError, match="2 prompts but 1"):
        exact_match(_base(), [[1], [2]], [[3]], torch.device("cpu"))
    with pytest.raises(ValueError, match="at least one token"):
        exact_match(_base(), [[1]], [[]], torch.device("cpu"))


def test_held_out_loss_is_the_token_mean():
    model = _base()
    tokens = np.random.default_rng(3).integers(1, VOCAB, 200).astype(np.uint32)
    batches = validation_batches(tokens, 3, 10, 4)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(),
                                                    reduction="sum") for x, y in batches]
    expected = float(sum(losses)) / sum(y.numel() for _, y in batches)
    assert held_out_loss(model, batches, torch.device("cpu")) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("exported", [False, True], ids=["transformers", "engram-lm"])
def test_generation_throughput_counts_the_new_tokens(exported, tokenizer, tmp_path):
    model = _base()
    if exported:  # the EngramLM of the same Llama, timed through its own generate (transformers' keywords would fail)
        (tmp_path / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
        model = to_engram_lm(model, tmp_path / "tokenizer.json")
    result = generation_throughput(model, torch.randint(1, VOCAB, (3, 5)), new_tokens=4, repeats=1)
    assert (result["batch"], result["new_tokens"]) == (3, 4)
    assert result["tokens_per_s"] == pytest.approx(12 / result["seconds"])
