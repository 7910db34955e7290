"""engram.hf: an EngramLM through transformers' Auto classes, forward, generate() and AutoTokenizer (CPU, no hub)."""

import json

import pytest
import torch
from tokenizers import Tokenizer

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from engram.hf import EngramForCausalLM, EngramHFConfig  # noqa: E402
from engram.model import EngramLM, EngramLMConfig  # noqa: E402


@pytest.fixture(scope="module")
def lm() -> EngramLM:
    torch.manual_seed(0)
    cfg = EngramLMConfig.from_preset("tiny", n_layers=2, ffn_kinds=["dense", "moe"], max_position_embeddings=64,
                                     engram_conv_zero_init=False, init_std=0.2)
    return EngramLM(cfg).eval()


@pytest.fixture(scope="module")
def folder(lm, tmp_path_factory):
    return EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path_factory.mktemp("hf"))


def prompts() -> torch.Tensor:
    return torch.randint(0, 128815, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("placement", ["device", "host"])
def test_auto_classes_load_the_folder_with_identical_logits(lm, folder, placement):
    assert json.loads((folder / "config.json").read_text())["model_type"] == "engram"
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, EngramHFConfig) and config.engram_lm_config == lm.cfg
    model = AutoModelForCausalLM.from_pretrained(folder, engram_placement=placement)
    assert isinstance(model, EngramForCausalLM) and not model.training
    ids = prompts()
    torch.testing.assert_close(model(ids).logits, lm(ids).logits, rtol=0, atol=0)


def test_an_engram_lm_folder_loads_too(lm, tmp_path):
    lm.save_pretrained(tmp_path)
    ids = prompts()
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, lm(ids).logits,
                               rtol=0, atol=0)


def test_transformers_generate_is_engram_greedy(lm, folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = prompts()
    expected = lm.generate(ids, max_new_tokens=8, temperature=0)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=8), expected)


def test_generate_with_left_padding(lm):
    model = EngramForCausalLM.from_engram(lm)
    ids = prompts()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = lm.generate(ids, max_new_tokens=8, temperature=0, attention_mask=mask)
    got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(got, expected)


def test_labels_loss_is_engram_lms(lm):
    model = EngramForCausalLM.from_engram(lm)
    ids = prompts()
    labels = ids.clone()
    labels[:, 1] = -100
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, lm(ids, labels=labels).loss, rtol=0, atol=0)
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, shifted)  # transformers' convention: labels shifted inside


def test_forward_refuses_inputs_it_would_ignore(lm):
    with pytest.raises(ValueError, match="inputs_embeds"):
        EngramForCausalLM.from_engram(lm)(prompts(), inputs_embeds=torch.zeros(2, 5, 64))


def test_auto_tokenizer_encodes_like_the_tokenizer_file(folder):
    text = "Engram remembers: the capital of France is Paris."
    expected = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == expected
