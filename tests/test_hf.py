"""engram.hf: an EngramLM through transformers' Auto classes, forward, generate() (with and without the KV cache),
the loss path, save/load options and AutoTokenizer (CPU, no hub)."""

import copy
import json
import time

import pytest
import torch
from tokenizers import Tokenizer

pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SuppressTokensLogitsProcessor  # noqa: E402

from engram.hf import EngramForCausalLM, EngramHFConfig  # noqa: E402
from engram.hf.modeling import SuppressFrom, shard_bytes  # noqa: E402
from engram.model import EngramLM, EngramLMConfig  # noqa: E402

# DeepSeek-V3's special tokens (the tiny preset's tokenizer)
BOS, EOS, PAD = 0, 1, 2


def _tiny_lm(max_positions: int) -> EngramLM:
    torch.manual_seed(0)
    cfg = EngramLMConfig.from_preset("tiny", n_layers=2, ffn_kinds=["dense", "moe"],
                                     max_position_embeddings=max_positions, engram_conv_zero_init=False, init_std=0.2)
    return EngramLM(cfg).eval()


@pytest.fixture(scope="module")
def lm() -> EngramLM:
    return _tiny_lm(64)


@pytest.fixture(scope="module")
def folder(lm, tmp_path_factory):
    return EngramForCausalLM.from_engram(lm).save_pretrained(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def long_lm() -> EngramLM:
    """Room for 144-token sequences (the cache's advantage grows with the length)."""
    return _tiny_lm(144)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, thread contention swamps small-model timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prompts(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(3, 128815, (batch, length), generator=torch.Generator().manual_seed(1))


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
    assert model(ids, labels=labels).logits is None  # the loss path makes no [B, T, V] logits unless asked
    out = model(ids, labels=labels, return_logits=True)
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


def _tokens_fed(model: EngramForCausalLM, **generate_kwargs) -> tuple[torch.Tensor, int, float]:
    """generate()'s output, the token positions EngramLM's forward was fed in all, and the seconds it took."""
    fed = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(args[0].shape[1]),
                                                 with_kwargs=True)
    start = time.perf_counter()
    out = model.generate(do_sample=False, **generate_kwargs)
    seconds = time.perf_counter() - start
    hook.remove()
    return out, sum(fed), seconds


def test_cached_generate_is_engram_greedy_and_faster(long_lm, one_thread):
    model = EngramForCausalLM.from_engram(long_lm)
    ids = prompts(batch=8, length=120)
    expected = long_lm.generate(ids, max_new_tokens=24, temperature=0)
    runs = {use_cache: [_tokens_fed(model, input_ids=ids, max_new_tokens=24, use_cache=use_cache) for _ in range(2)]
            for use_cache in (True, False)}
    for use_cache, [(out, _, _), _] in runs.items():
        assert torch.equal(out, expected), use_cache
    assert runs[True][0][1] == 120 + 23  # the prompt once, then one token a step
    assert runs[False][0][1] == sum(range(120, 144))  # the whole sequence every step
    assert min(r[2] for r in runs[True]) < min(r[2] for r in runs[False])
    assert _tokens_fed(model, input_ids=ids, max_new_tokens=24)[1] == 120 + 23  # the cache is the default


def test_cache_by_hand_continues_a_left_padded_batch(long_lm):
    model = EngramForCausalLM.from_engram(long_lm)
    ids = prompts(length=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    full = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        first = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        assert first.cache.get_seq_length() == 7
        second = model(ids[:, 7:], attention_mask=mask, cache=first.cache)
    assert second.cache is first.cache and first.cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1)[1], full[1], rtol=0, atol=1e-4)
    torch.testing.assert_close(second.logits[0], full[0, 7:], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(ids[:1, :1], cache=first.cache)


def test_beam_search_is_refused(lm):
    with pytest.raises(ValueError, match="beam"):
        EngramForCausalLM.from_engram(lm).generate(prompts(), num_beams=2, max_new_tokens=2)


def test_generate_stops_at_eos_as_engram_does(lm):
    model = EngramForCausalLM.from_engram(lm)
    ids = prompts()
    free = lm.generate(ids, max_new_tokens=8, temperature=0)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 produces it at its third new token
    expected = lm.generate(ids, max_new_tokens=8, temperature=0, eos_token_id=eos)
    got = model.generate(ids, do_sample=False, max_new_tokens=8, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(got, expected[:, :got.shape[1]]) and bool((expected[:, got.shape[1]:] == eos).all())


def test_special_token_ids_come_from_the_tokenizer(lm, folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, PAD)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)


def test_suppress_from_equals_transformers_suppress_tokens():
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(3, 1, dtype=torch.long)
    expected = SuppressTokensLogitsProcessor(list(range(41, 50)))(ids, scores.clone())
    assert torch.equal(SuppressFrom(41)(ids, scores), expected)


def test_num_items_in_batch_divides_the_summed_loss(lm):
    model = EngramForCausalLM.from_engram(lm)
    ids = prompts(length=9)
    labels = ids.clone()
    labels[0, 3] = -100
    mean = model(ids, labels=labels).loss
    counted = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=4 * counted).loss, mean / 4)


def test_training_loss_adds_the_moe_auxiliary_loss():
    torch.manual_seed(0)
    cfg = EngramLMConfig.from_preset("tiny", n_layers=2, ffn_kinds=["dense", "moe"], max_position_embeddings=64)
    cfg.moe.seq_aux_loss_coef = 0.1
    lm = EngramLM(cfg).train()
    ids = prompts(length=9)
    out = lm(ids, labels=ids)
    assert out.aux_loss is not None
    torch.testing.assert_close(EngramForCausalLM.from_engram(lm)(ids, labels=ids).loss, out.loss + out.aux_loss)


def test_save_and_load_options_round_trip(lm, tmp_path):
    model = EngramForCausalLM.from_engram(lm)
    assert model.save_pretrained(tmp_path / "none", is_main_process=False) == tmp_path / "none"
    assert not (tmp_path / "none").exists()
    folder = model.save_pretrained(tmp_path / "hf", max_shard_size="20MB", safe_serialization=True, state_dict=None)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16} and loaded.device.type == "cpu"
    ids = prompts()
    torch.testing.assert_close(loaded(ids).logits, copy.deepcopy(lm).to(torch.bfloat16)(ids).logits, rtol=0, atol=0)
    same = AutoModelForCausalLM.from_pretrained(folder, torch_dtype="float32")
    torch.testing.assert_close(same(ids).logits, lm(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="engram_placment"):  # a typo is named, not passed on
        AutoModelForCausalLM.from_pretrained(folder, engram_placment="host")
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(ValueError, match="one device"):
        AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"})


@pytest.mark.parametrize("size, expected", [(1000, 1000), ("2GB", 2 * 10**9), ("1.5MB", 1_500_000),
                                            ("500MiB", 500 * 2**20), (" 3 kb ", 3000)])
def test_shard_sizes(size, expected):
    assert shard_bytes(size) == expected


def test_bad_shard_size_is_refused():
    with pytest.raises(ValueError, match="'2 bytes'"):
        shard_bytes("2 bytes")
