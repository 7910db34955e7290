"""Retrofit Engram onto tiny random transformers causal LMs (no hub): exact no-op at init, only Engram parameters
train, cached generation equals uncached, adapter round trip and refusal of another base, merged standalone folders."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

from engram import EngramConfig
from engram.hf import (base_fingerprint, engram_parameters, freeze_base, load_adapter, retrofit, save_adapter,
                       save_merged)

VOCAB = 48
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)
ENGRAM = EngramConfig(engram_vocab_size=[97, 101], n_embed_per_ngram=32, n_head_per_ngram=2, layer_ids=[0],
                      pad_id=0)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**SMALL))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**SMALL))


def _mistral():
    return MistralForCausalLM(MistralConfig(**SMALL))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=64))


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of VOCAB ids, several of which compress together (case, leading space)."""
    words = ["<pad>"] + [w for i in range(VOCAB // 3) for w in (f"w{i}", f"W{i}", f" w{i}")]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:VOCAB])}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def _ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _perturb(model) -> None:
    """Move every Engram parameter off its no-op start, as training would."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in engram_parameters(model):
            param.add_(torch.randn_like(param) * 0.5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_retrofit_starts_as_an_exact_no_op(family, tokenizer):
    ids = _ids()
    base = _model(family)
    with torch.no_grad():
        before = base(ids).logits
        model = retrofit(base, tokenizer, [0, 2], ENGRAM)
        after = model(ids).logits
    assert model is base and sorted(model.engram_retrofit.layers) == ["0", "2"]
    assert torch.equal(before, after)
    _perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)  # the hooks are live


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_moves_only_engram_parameters(family, tokenizer):
    model = retrofit(_model(family), tokenizer, [1], ENGRAM).train()
    params = freeze_base(model)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = _ids(batch=4, length=8)
    optimiser = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith("engram_retrofit.") for name in changed)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_uncached(family, tokenizer):
    model = retrofit(_model(family), tokenizer, [0, 1], ENGRAM)
    _perturb(model)
    ids = _ids(batch=2, length=5)
    kwargs = dict(do_sample=False, max_new_tokens=6, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
        again = model.generate(ids, use_cache=True, **kwargs)  # a new sequence starts over
    assert torch.equal(cached, uncached) and torch.equal(cached, again)


def test_inputs_embeds_are_refused(tokenizer):
    model = retrofit(_model("llama"), tokenizer, [0], ENGRAM)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 64))


def test_bad_layers_and_double_retrofit_are_refused(tokenizer):
    with pytest.raises(ValueError, match=r"layers \[3\]"):
        retrofit(_model("llama"), tokenizer, [3], ENGRAM)
    model = retrofit(_model("llama"), tokenizer, [0], ENGRAM)
    with pytest.raises(ValueError, match="already"):
        retrofit(model, tokenizer, [1], ENGRAM)


def test_default_config_follows_the_tokenizer(tokenizer):
    model = retrofit(_model("llama"), tokenizer, [1], None)
    holder = model.engram_retrofit
    assert holder.cfg.layer_ids == [1] and holder.cfg.pad_id == tokenizer.pad_token_id
    assert holder.hasher.tokenizer.original_vocab_size == VOCAB
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, _model("llama")(_ids()).logits)


def test_adapter_round_trip_gives_identical_logits(tokenizer, tmp_path):
    model = retrofit(_model("llama"), tokenizer, [0, 2], ENGRAM)
    _perturb(model)
    fingerprint = base_fingerprint(model)
    save_adapter(model, tmp_path / "adapter", base_reference="tiny-llama")
    loaded = load_adapter(_model("llama"), tokenizer, tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert base_fingerprint(loaded) == fingerprint == base_fingerprint(_model("llama"))
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["engram_adapter.json", "engram_adapter.safetensors"]


def test_adapter_refuses_another_base(tokenizer, tmp_path):
    model = retrofit(_model("llama"), tokenizer, [0], ENGRAM)
    save_adapter(model, tmp_path / "adapter")
    other = _model("llama", seed=1)
    with pytest.raises(ValueError) as err:
        load_adapter(other, tokenizer, tmp_path / "adapter")
    assert base_fingerprint(model) in str(err.value) and base_fingerprint(other) in str(err.value)
    assert not hasattr(other, "engram_retrofit")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_folder_loads_standalone(family, tokenizer, tmp_path):
    model = retrofit(_model(family), tokenizer, [0, 2], ENGRAM)
    _perturb(model)
    folder = save_merged(model, tokenizer, tmp_path / "merged")
    assert AutoConfig.from_pretrained(folder).model_type == "engram_retrofit"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert type(loaded) is type(model) and hasattr(loaded, "engram_retrofit")
    assert not any(key.startswith("engram_retrofit") for key in AutoModelForCausalLM.from_pretrained(
        folder / "base").state_dict())  # the base folder holds the base only
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(folder)("w1 W2").input_ids == tokenizer("w1 W2").input_ids
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_merged_folder_refuses_a_swapped_base(tokenizer, tmp_path):
    model = retrofit(_model("llama"), tokenizer, [0], ENGRAM)
    folder = save_merged(model, tokenizer, tmp_path / "merged")
    _model("llama", seed=1).save_pretrained(folder / "base")
    with pytest.raises(ValueError, match="fingerprint"):
        AutoModelForCausalLM.from_pretrained(folder)
