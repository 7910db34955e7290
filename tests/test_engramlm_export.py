"""A Llama-family transformers model, retrofitted or not, exported as an EngramLM: the same logits and greedy tokens,
a folder that `engram serve`'s engine loads with per-tenant memory, and refusals of what an EngramLM cannot hold."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from engram.hf import retrofit
from engram.hf.export import export_engram_lm, to_engram_lm
from engram.model import EngramLM
from engram.serve.engine import Engine, GenerationRequest

from serve.serve_helpers import overlay_for, write_patch
from test_retrofit import ENGRAM, SMALL, VOCAB, _ids, _perturb, tokenizer  # noqa: F401 - the fixture


def _llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMALL, **overrides)).eval()


def _mistral():
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)).eval()


@pytest.mark.parametrize("make", [_llama, _mistral, lambda: _llama(tie_word_embeddings=True)],
                         ids=["llama", "mistral", "llama-tied"])
@pytest.mark.parametrize("retrofitted", [True, False], ids=["retrofitted", "plain"])
def test_the_exported_model_gives_the_same_logits_and_greedy_tokens(make, retrofitted, tokenizer, tmp_path):
    model = make()
    if retrofitted:
        retrofit(model, tokenizer, [0, 2], ENGRAM)
        _perturb(model)  # trained-like Engram weights: the delta is not zero
    ids = _ids(2, 9)
    folder = export_engram_lm(model, tokenizer, tmp_path / "exported")
    exported = EngramLM.from_pretrained(folder).eval()
    assert exported.cfg.engram_layer_ids == ([0, 2] if retrofitted else [])
    assert exported.cfg.hc_mult == 1 and exported.cfg.moe is None
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(exported.generate(ids, 6, temperature=0, decode="eager"), expected)


def test_the_exported_folder_serves_tenants_with_their_own_memory(tokenizer, tmp_path):
    model = retrofit(_llama(), tokenizer, [0, 2], ENGRAM)
    _perturb(model)
    folder = export_engram_lm(model, tokenizer, tmp_path / "exported")
    with Engine.from_checkpoint(folder, device="cpu", max_batch=4) as engine:
        prompt = (engine.bos_id, *_ids(1, 8, seed=5)[0].tolist())
        patch = write_patch(engine.model, tmp_path / "tenant.patch", overlay_for(engine.model, prompt, seed=2))
        tenant = engine.load_overlay(patch)  # checked against the exported model's fingerprint
        base_request = GenerationRequest(prompt, 8, 0.0)
        base, with_memory = engine.complete_many([base_request, GenerationRequest(prompt, 8, 0.0, overlay=tenant)])
        assert base.text == engine.complete(base_request).text  # the tenant's rows never reach the base row
        assert with_memory.text != base.text


def test_what_an_engram_lm_cannot_hold_is_refused(tokenizer, tmp_path):
    torch.manual_seed(0)
    file = tmp_path / "tokenizer.json"
    file.write_text(Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()).to_str())
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        to_engram_lm(Qwen2ForCausalLM(Qwen2Config(**SMALL)), file)
    with pytest.raises(ValueError, match="sliding_window=64"):
        to_engram_lm(MistralForCausalLM(MistralConfig(**SMALL, sliding_window=64)), file)
    with pytest.raises(ValueError, match="attention_bias=True"):
        to_engram_lm(_llama(attention_bias=True), file)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        to_engram_lm(_llama(hidden_act="gelu"), file)
    scaled = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        to_engram_lm(_llama(rope_parameters=scaled), file)
    other = Tokenizer(models.WordLevel({f"x{i}": i for i in range(VOCAB)}, unk_token="x0"))  # no case folding
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other_file = tmp_path / "other.json"
    other_file.write_text(other.to_str())
    retrofitted = retrofit(_llama(), tokenizer, [1], ENGRAM)
    with pytest.raises(ValueError, match="hashes other rows"):
        to_engram_lm(retrofitted, other_file)
    pretty = tmp_path / "pretty.json"
    tokenizer.backend_tokenizer.save(str(pretty), pretty=True)  # other bytes (digest), the same tokenizer
    assert to_engram_lm(retrofitted, pretty).cfg.engram_layer_ids == [1]


def test_engram_tune_writes_a_tenant_patch_for_an_exported_llama(text_dir, tmp_path):
    """A SentencePiece-style tokenizer (Llama 2, Mistral) all the way: retrofit, export, `engram tune` on the folder,
    and the patch loads into the server's engine as a tenant's memory."""
    from tokenizers import decoders, trainers
    from transformers import PreTrainedTokenizerFast

    from engram.cli import main

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train([str(path) for path in sorted(text_dir.iterdir())],
                  trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>"], show_progress=False))
    sentencepiece = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": backend.get_vocab_size()})).eval()
    retrofit(model, sentencepiece, [1], ENGRAM)
    _perturb(model)  # a trained retrofit (untrained, its value projection is zero and no table row gets a gradient)
    folder = export_engram_lm(model, sentencepiece, tmp_path / "exported")
    patch = tmp_path / "tenant.patch"
    assert main(["tune", "--checkpoint", str(folder), "--data", str(text_dir), "--out", str(patch), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]) == 0
    with Engine.from_checkpoint(folder, device="cpu") as engine:
        overlay = engine.load_overlay(patch)
        assert overlay.layers and all(rows.numel() > 0 for rows, _ in overlay.layers.values())
