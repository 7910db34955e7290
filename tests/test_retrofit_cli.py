"""`engram retrofit` end to end on a tiny random Llama saved to disk (no hub): it trains, prints the held-out loss,
writes an adapter that reproduces the trained model on a fresh base, and refuses bad input with exit code 2."""

import pytest
import torch
from conftest import TRAIN_WORDS
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engram.cli import main
from engram.hf import engram_parameters, load_adapter
from engram.hf.retrofit_train import load_base, train_retrofit
from engram.model import EngramLM
from engram.train.retrofit import RetrofitConfig

ARGS = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "2", "--no-progress"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random 3-layer Llama and a word-level tokenizer of the words of conftest's ``text_dir``, saved together."""
    words = ["<pad>", *sorted(set(TRAIN_WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("llama")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_retrofit_command_writes_an_adapter_that_reproduces_the_trained_model(base_dir, text_dir, tmp_path, capsys):
    out, exported = tmp_path / "adapter", tmp_path / "engram-lm"
    assert main(["retrofit", "--model", str(base_dir), "--layers", "0", "2", "--out", str(out),
                 "--data", str(text_dir), "--export", str(exported), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss:" in printed and f"EngramLM folder written to {exported}" in printed
    assert {p.name for p in out.iterdir()} == {"engram_adapter.json", "engram_adapter.safetensors"}

    result = train_retrofit(RetrofitConfig(str(base_dir), [0, 2], str(tmp_path / "again"), [str(text_dir)],
                                           steps=4, batch_size=2, seq_len=16, eval_batches=2, progress=False))
    fresh, tokenizer = load_base(str(base_dir))
    load_adapter(fresh, tokenizer, out)
    for trained, loaded in zip(engram_parameters(result.model), engram_parameters(fresh)):
        assert torch.equal(trained, loaded)  # same seed, same steps: the CLI's run and the API's agree
    ids = torch.randint(1, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, result.model(ids).logits, rtol=0, atol=0)
        base, _ = load_base(str(base_dir))
        assert not torch.allclose(fresh(ids).logits, base(ids).logits)  # the adapter does something
        # --export: the same trained model as an EngramLM folder (what engram serve and engram tune read)
        torch.testing.assert_close(EngramLM.from_pretrained(exported)(ids).logits, fresh(ids).logits, rtol=1e-5,
                                   atol=1e-5)
    assert result.val_loss_after < result.val_loss_before


@pytest.mark.parametrize("change, message", [
    ({"--layers": ["1", "3"]}, "layers [3] are not decoder layers"),
    ({"--model": ["missing-folder"]}, "model folder 'missing-folder' does not exist"),
    ({"--seq-len": ["65"]}, "seq_len 65 exceeds"),
])
def test_retrofit_command_refuses_bad_input(base_dir, text_dir, tmp_path, capsys, change, message):
    flags = {"--model": [str(base_dir)], "--layers": ["1"], "--out": [str(tmp_path / "adapter")],
             "--data": [str(text_dir)], **change}
    argv = ["retrofit", *ARGS, *[item for flag, values in flags.items() for item in (flag, *values)]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


def test_export_of_a_model_an_engram_lm_cannot_hold_is_refused_before_training(base_dir, text_dir, tmp_path,
                                                                               capsys):
    biased = tmp_path / "biased"
    model, tokenizer = load_base(str(base_dir))
    tokenizer.save_pretrained(biased)
    LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "attention_bias": True})).save_pretrained(biased)
    argv = ["retrofit", "--model", str(biased), "--layers", "1", "--out", str(tmp_path / "adapter"), "--data",
            str(text_dir), "--export", str(tmp_path / "engram-lm"), *ARGS]
    assert main(argv) == 2
    assert "attention_bias=True" in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


def test_retrofit_config_refuses_empty_data_and_layers():
    with pytest.raises(ValueError, match="data must name"):
        RetrofitConfig("m", [1], "out", [])
    with pytest.raises(ValueError, match="layers must name"):
        RetrofitConfig("m", [], "out", ["x.txt"])
