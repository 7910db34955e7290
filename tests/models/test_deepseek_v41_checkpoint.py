"""Loading the Engram of a DeepSeek-V4.1-format checkpoint (a synthetic one, ``v41_checkpoint.py``) and running it.

References written here, without engram code: row ids from the plain-Python hashing of ``test_deepseek_v41.py``,
FP8 bytes decoded by their bit formula in numpy, the V4.1 layer as one torch statement.
"""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_deepseek_v41 import IMAGE_TOKEN, expected, random_sequences, reference_primes, stand_in_tokenizer
from v41_checkpoint import (BRANCHES, HEAD_DIM, HIDDEN, LAYERS, RMS_EPS, VOCAB, as_bytes, backbone_tensors,
                            decoded_rows, decoded_wkv, engram_tensors, flat_offsets, table_rows, text_config,
                            write_checkpoint)

from engram import Engram, EngramConfig, NgramHasher
from engram.models.deepseek_v41 import (DeepSeekV41Engram, backbone_dims, load_deepseek_v41_engram, read_engram_config,
                                        read_text_config)


def flat_reference_rows(ids: torch.Tensor, dead: torch.Tensor, layer: int) -> np.ndarray:
    """``[B, T, 24]`` rows of the layer's flat table: the reference's per-head rows plus each head's offset."""
    return expected(HASHER_FOR_REFERENCE, ids, dead, layer, VOCAB).numpy() + flat_offsets(layer)


HASHER_FOR_REFERENCE = NgramHasher(EngramConfig.from_hf_config({"text_config": text_config()}),
                                   tokenizer=stand_in_tokenizer())  # the reference reads its tokenizer lookup


def v41_formula(tensors: dict, layer: int, hidden: torch.Tensor, memory: np.ndarray, dead: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The V4.1 layer in one statement, fp32: ``(h + gate * value in fp32, cast to h's dtype; gates [B, T, M])``.

    ``memory`` ``[B, T, 24 * HEAD_DIM]``: the rows read. keys, value = wkv e (the M keys first);
    s_m = <rms(k_m) w_k, rms(h_m) w_q> / sqrt(D) with rms(x) = x / sqrt(mean(x^2) + eps), eps the config's
    rms_norm_eps; gate = sigmoid(sign(s) sqrt(max(|s|, 1e-6))) with sign(0) = +1, 0 at dead positions.
    """
    wkv = torch.from_numpy(decoded_wkv(tensors, layer)).float()
    kv = torch.from_numpy(memory).float() @ wkv.T
    keys, value = kv[..., :BRANCHES * HIDDEN].unflatten(-1, (BRANCHES, HIDDEN)), kv[..., BRANCHES * HIDDEN:]
    q_weight, k_weight = (tensors[f"layers.{layer}.engram.{n}"].float() for n in ("q_weight", "k_weight"))
    h = hidden.float()

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + text_config()["rms_norm_eps"]) * weight

    score = (rms(keys, k_weight) * rms(h, q_weight)).sum(-1) / math.sqrt(HIDDEN)
    sign = torch.where(score < 0, -1.0, 1.0)
    gates = torch.sigmoid(sign * score.abs().clamp_min(1e-6).sqrt()).masked_fill(dead[..., None], 0.0)
    return (h + gates[..., None] * value[:, :, None]).to(hidden.dtype), gates


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """Both layouts of one synthetic checkpoint and the tensors written into them."""
    root = tmp_path_factory.mktemp("v41")
    tensors = {**backbone_tensors(), **engram_tensors()}
    return {"tensors": tensors, "sharded": write_checkpoint(root / "sharded", tensors),
            "single": write_checkpoint(root / "single", tensors, sharded=False)}


@pytest.fixture(scope="module")
def loaded(written) -> DeepSeekV41Engram:
    return load_deepseek_v41_engram(written["sharded"], tokenizer=stand_in_tokenizer(), dtype=torch.float32,
                                    dead_token_ids=[128_001])


def test_config_gives_the_table_sums(written, loaded):
    cfg = read_engram_config(written["sharded"])
    assert cfg.variant == "deepseek-v4.1" and cfg.layer_ids == list(LAYERS) and cfg.head_dim == HEAD_DIM
    assert [sum(loaded.hasher.flat_table_sizes(layer)) for layer in LAYERS] == [table_rows()[layer] for layer in LAYERS]
    assert loaded.hasher.flat_table_sizes(14) == reference_primes(VOCAB)[14]
    assert backbone_dims(read_text_config(written["sharded"])) == (HIDDEN, BRANCHES)
    assert backbone_dims({}, hidden_size=32, hc_mult=2) == (32, 2)


def test_loaded_tables_and_weights_equal_the_bytes_written(written, loaded):
    tensors = written["tensors"]
    assert loaded.layer_ids == list(LAYERS) and not any(p.requires_grad for p in loaded.parameters())
    for layer in LAYERS:
        engram, prefix = loaded[layer], f"layers.{layer}.engram."
        assert engram.short_conv is None and engram.value_key_proj.bias is None
        packed = engram.multi_head_embedding.weight
        assert packed.dtype == torch.uint8 and packed.shape == (table_rows()[layer], HEAD_DIM + HEAD_DIM // 32)
        assert np.array_equal(packed[:, :HEAD_DIM].numpy(), as_bytes(tensors[prefix + "embed.weight"]))
        assert np.array_equal(packed[:, HEAD_DIM:].numpy(), as_bytes(tensors[prefix + "embed.scale"]))
        assert np.array_equal(engram.value_key_proj.weight.double().numpy(), decoded_wkv(tensors, layer))
        assert torch.equal(engram.query_norm.weight, tensors[prefix + "q_weight"].float())
        assert torch.equal(engram.key_norm.weight, tensors[prefix + "k_weight"].float())
        assert engram.key_norm.eps == engram.query_norm.eps == RMS_EPS


def test_bf16_projection_holds_wkv_exactly(written):
    engram = load_deepseek_v41_engram(written["single"], layers=[1], tokenizer=stand_in_tokenizer())
    weight = engram[1].value_key_proj.weight
    assert weight.dtype == torch.bfloat16
    assert np.array_equal(weight.double().numpy(), decoded_wkv(written["tensors"], 1))


@pytest.mark.parametrize("dead_by", ["mask", "token-id"])
def test_lookup_matches_the_reference(written, loaded, dead_by):
    ids, dead = random_sequences(7, batch=3, length=13)
    if dead_by == "token-id":  # the loader's dead_token_ids mark the same positions
        ids = ids.masked_fill(dead, 128_001)
        reads = loaded.lookup(ids)
    else:
        reads = loaded.lookup(ids, dead_mask=dead)
    assert set(reads) == set(LAYERS)
    for layer, read in reads.items():
        rows = flat_reference_rows(ids, dead, layer)
        assert np.array_equal(read.row_ids.numpy(), rows)
        assert read.values.shape == (3, 13, 24, HEAD_DIM) and read.values.dtype == torch.float32
        assert np.array_equal(read.values.double().numpy(), decoded_rows(written["tensors"], layer, rows))


def test_sharded_and_single_file_load_the_same(written, loaded):
    single = load_deepseek_v41_engram(written["single"], tokenizer=stand_in_tokenizer(), dtype=torch.float32)
    assert single.state_dict().keys() == loaded.state_dict().keys()
    for name, tensor in single.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_one_layer_loads_alone(written):
    only = load_deepseek_v41_engram(written["sharded"], layers=[14], tokenizer=stand_in_tokenizer())
    assert only.layer_ids == [14] and only.hasher.cfg.layer_ids == list(LAYERS)
    ids = torch.randint(0, 129_280, (1, 6))
    assert set(only.lookup(ids)) == {14}
    with pytest.raises(KeyError, match="layer 1 is not a loaded Engram layer"):
        only[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_matches_the_v41_formula(written, loaded, dtype):
    ids, dead = random_sequences(11, batch=2, length=9)
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.randn(2, 9, BRANCHES, HIDDEN, generator=gen) * 3 + 0.5)
    hidden[:, 4] *= 1e-6  # far below RMSNorm's eps, the config's rms_norm_eps (1e-6): it decides their gates
    hidden = hidden.to(dtype)
    engram = loaded if dtype == torch.float32 else load_deepseek_v41_engram(
        written["sharded"], tokenizer=stand_in_tokenizer(), dtype=dtype)
    for layer in LAYERS:
        memory = decoded_rows(written["tensors"], layer, flat_reference_rows(ids, dead, layer)).reshape(2, 9, -1)
        want, want_gates = v41_formula(written["tensors"], layer, hidden, memory, dead)
        got, gates = engram(hidden, ids, layer_id=layer, dead_mask=dead, return_gates=True)
        assert got.dtype == dtype and gates.dtype == torch.float32
        assert torch.equal(got[dead], hidden[dead]) and (gates[dead] == 0).all()
        if dtype == torch.float32:
            torch.testing.assert_close(gates, want_gates, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:  # the bf16 projection rounds keys and value to bf16; the sum is rounded to bf16 once
            torch.testing.assert_close(gates, want_gates, atol=3e-2, rtol=0)
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * scale, rtol=2e-2)
        assert (gates[~dead] > 0).all() and (gates[~dead] < 1).all()
        by_add_to = engram[layer].add_to(hidden, input_ids=ids, dead_mask=dead)
        assert torch.equal(by_add_to, got)


def test_the_image_token_is_dead_without_a_mask(loaded):
    """Positions holding id 129,264 read as dead, gate 0 and the hidden state unchanged, with no dead_mask: through
    the loaded layers and through Engram.forward given the ids."""
    ids, dead = random_sequences(13, batch=2, length=10)
    ids = ids.masked_fill(dead, IMAGE_TOKEN)
    hidden = torch.randn(2, 10, BRANCHES, HIDDEN, generator=torch.Generator().manual_seed(13))
    assert IMAGE_TOKEN in loaded.dead_token_ids and 128_001 in loaded.dead_token_ids  # the config's, the loader's
    for layer in LAYERS:
        got, gates = loaded(hidden, ids, layer_id=layer, return_gates=True)
        want, want_gates = loaded(hidden, ids, layer_id=layer, dead_mask=dead, return_gates=True)
        assert torch.equal(got, want) and torch.equal(gates, want_gates)
        assert (gates[dead] == 0).all() and torch.equal(got[dead], hidden[dead]) and (gates[~dead] > 0).all()
        delta, by_forward = loaded[layer](hidden, input_ids=ids, return_gates=True)
        assert torch.equal(by_forward, want_gates) and (delta[dead] == 0).all()


def test_a_score_of_exactly_zero_gives_the_engines_gate():
    """Key norm weights of 0 make every score exactly 0: V4.1's gate is then sigmoid(+sqrt(1e-6)) = 0.50025, as in
    the engines (the demo's sign(0) = 0 would give 0.5)."""
    cfg = EngramConfig.from_hf_config({"text_config": text_config()})
    layer = Engram(cfg, 14, HIDDEN, BRANCHES, hasher=HASHER_FOR_REFERENCE)
    with torch.no_grad():
        layer.key_norm.weight.zero_()
    hidden = torch.randn(1, 5, BRANCHES, HIDDEN, generator=torch.Generator().manual_seed(2))
    _, gates = layer(hidden, input_ids=torch.tensor([[5, 6, 7, 8, 9]]), return_gates=True)
    assert torch.equal(gates, torch.full_like(gates, torch.sigmoid(torch.tensor(1e-6).sqrt()).item()))
    assert gates[0, 0, 0].item() == pytest.approx(0.50025, abs=1e-7)


def test_only_the_product_of_the_norm_weights_counts():
    """q_weight and k_weight enter the score only through their product: swapping them, or moving a factor from
    one to the other, changes the gates by fp32 rounding only."""
    cfg = EngramConfig.from_hf_config({"text_config": text_config()})
    layer = Engram(cfg, 1, HIDDEN, BRANCHES, hasher=HASHER_FOR_REFERENCE)
    gen = torch.Generator().manual_seed(4)
    k_weight, q_weight = (0.5 + torch.rand(2, BRANCHES, HIDDEN, generator=gen)).unbind(0)
    hidden = torch.randn(2, 6, BRANCHES, HIDDEN, generator=gen)
    ids = torch.randint(0, 129_280, (2, 6), generator=gen)
    gates = []
    for key, query in ((k_weight, q_weight), (q_weight, k_weight), (k_weight * q_weight, torch.ones_like(q_weight))):
        with torch.no_grad():
            layer.key_norm.weight.copy_(key)
            layer.query_norm.weight.copy_(query)
        gates.append(layer(hidden, input_ids=ids, return_gates=True)[1])
    assert not torch.equal(gates[0], torch.full_like(gates[0], 0.5))
    for other in gates[1:]:
        torch.testing.assert_close(other, gates[0], atol=1e-6, rtol=0)


def test_chunks_with_history_equal_the_whole_sequence(loaded):
    ids, dead = random_sequences(5, batch=2, length=12)
    hidden = torch.randn(2, 12, BRANCHES, HIDDEN, generator=torch.Generator().manual_seed(5))
    whole = loaded(hidden, ids, layer_id=14, dead_mask=dead)
    history, pieces = None, []
    for lo, hi in ((0, 2), (2, 7), (7, 8), (8, 12)):
        pieces.append(loaded(hidden[:, lo:hi], ids[:, lo:hi], layer_id=14, dead_mask=dead[:, lo:hi], history=history))
        history = loaded.hasher.next_history(ids[:, lo:hi], history, dead_mask=dead[:, lo:hi])
    # equal up to fp32 rounding (the projection's GEMM blocks differ with the number of tokens)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5 * whole.abs().max().item(), rtol=1e-5)


def test_the_layer_without_a_checkpoint():
    """The V4.1 layer built from a config: no ShortConv, no bias, FP8 rows; the demo refuses a dead mask."""
    cfg = EngramConfig.from_hf_config({"text_config": text_config()})
    layer = Engram(cfg, 1, HIDDEN, BRANCHES, hasher=HASHER_FOR_REFERENCE)
    assert set(layer.state_dict()) == {"multi_head_embedding.weight", "value_key_proj.weight", "key_norm.weight",
                                       "query_norm.weight"}
    assert layer.multi_head_embedding.row_format == "fp8"
    hidden = torch.randn(1, 3, BRANCHES, HIDDEN, dtype=torch.bfloat16)
    delta = layer(hidden, input_ids=torch.tensor([[5, 6, 7]]))
    assert delta.dtype == torch.float32
    assert torch.equal(layer.residual(hidden, delta), (hidden.float() + delta).to(torch.bfloat16))
    with pytest.raises(ValueError, match="dead_mask must be a bool"):
        layer(hidden, input_ids=torch.tensor([[5, 6, 7]]), dead_mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="add_to returns the hidden state only"):
        layer.add_to(hidden, input_ids=torch.tensor([[5, 6, 7]]), return_gates=True)


def _drop(name):
    def change(tensors, config):
        del tensors[name]
    return change


def _put(name, tensor):
    def change(tensors, config):
        tensors[name] = tensor
    return change


def _config(**changes):
    def change(tensors, config):
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
    return change


def _fewer_rows(tensors, config):
    for part in ("weight", "scale"):
        name = f"layers.14.engram.embed.{part}"
        tensors[name] = tensors[name][:-1].clone()


ROWS_14 = table_rows()[14]
BROKEN = {
    "missing": (_drop("layers.14.engram.k_weight"), "no tensor layers.14.engram.k_weight"),
    "unexpected": (_put("layers.1.engram.wkv.bias", torch.zeros(3)),
                   "unexpected Engram tensor layers.1.engram.wkv.bias in model-00001-of-00002.safetensors"),
    "not-an-engram-layer": (_put("layers.3.engram.q_weight", torch.zeros(3)),
                            "tensor layers.3.engram.q_weight in model-00001-of-00002.safetensors is at layer 3"),
    "dtype": (_put("layers.1.engram.embed.scale", torch.zeros(table_rows()[1], 1, dtype=torch.uint8)),
              r"layers.1.engram.embed.scale in model-00002-of-00002.safetensors is U8, expected F8_E8M0"),
    "shape": (_put("layers.1.engram.wkv.weight", torch.zeros(768, 320).to(torch.float8_e4m3fn)),
              r"layers.1.engram.wkv.weight in model-00001-of-00002.safetensors has shape \[768, 320\], "
              r"expected \[320, 768\]"),
    "table-rows": (_fewer_rows, rf"layers.14.engram.embed.weight in model-00002-of-00002.safetensors has shape "
                               rf"\[{ROWS_14 - 1}, 32\], expected \[{ROWS_14}, 32\] \(\[rows, head_dim\]; rows = "
                               rf"{ROWS_14}, the sum of layer 14's prime table sizes\)"),
    "num-embeddings": (_config(engram_num_embeddings=[1, 2]), "engram_num_embeddings .* disagrees"),
    "no-hidden-size": (_config(hidden_size=None), "config has no 'hidden_size'"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoints_are_refused_by_name(tmp_path, case):
    change, message = BROKEN[case]
    tensors, config = {**backbone_tensors(), **engram_tensors()}, text_config()
    change(tensors, config)
    folder = write_checkpoint(tmp_path / case, tensors, config)
    with pytest.raises(ValueError, match=message):
        load_deepseek_v41_engram(folder, tokenizer=stand_in_tokenizer())


def test_missing_files_and_layers_are_refused(tmp_path, written):
    with pytest.raises(ValueError, match="has no config.json"):
        load_deepseek_v41_engram(tmp_path, tokenizer=stand_in_tokenizer())
    (tmp_path / "config.json").write_text(json.dumps(text_config()))  # a whole config without text_config works too
    with pytest.raises(ValueError, match="holds neither model.safetensors nor model.safetensors.index.json"):
        load_deepseek_v41_engram(tmp_path, tokenizer=stand_in_tokenizer())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "x": "model-00001-of-00002.safetensors", "layers.1.engram.q_weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="maps tensor layers.1.engram.q_weight to model-00002-of-00002.safetensors, "
                                         "which is not in"):
        load_deepseek_v41_engram(tmp_path, tokenizer=stand_in_tokenizer())
    with pytest.raises(ValueError, match=r"layer 3 is not an Engram layer .* \(engram_layer_ids: \[1, 14\]\)"):
        load_deepseek_v41_engram(written["sharded"], layers=[3], tokenizer=stand_in_tokenizer())
