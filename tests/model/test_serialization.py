import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engram import NgramHasher
from engram.model import EngramLM
from engram.storage.checksums import FileIntegrityError

from lm_helpers import small_config


def trained_like(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = EngramLM(small_config(**kwargs))
    with torch.no_grad():  # move every weight and buffer away from its init
        for tensor in list(model.parameters()) + [m.expert_bias for m in model.moe_layers]:
            tensor.add_(torch.randn_like(tensor) * 0.01)
    return model.eval()


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(3, 128_815, (2, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("engram", [True, False], ids=["engram", "baseline"])
def test_round_trip_is_exact(tmp_path, engram):
    model = trained_like(engram=engram)
    model.save_pretrained(tmp_path)
    tables = {"engram-layer-0.safetensors", "engram-layer-2.safetensors"} if engram else set()
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "checksums.json", "model.safetensors"} | tables
    assert_same_model(model, EngramLM.from_pretrained(tmp_path).eval())


def test_sharded_round_trip_and_resave(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path, max_shard_bytes=2_000_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert_same_model(model, EngramLM.from_pretrained(tmp_path).eval())
    model.save_pretrained(tmp_path)  # a single-file save over a sharded one leaves no stale shards
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checksums.json", "config.json", "engram-layer-0.safetensors", "engram-layer-2.safetensors",
        "model.safetensors"]
    assert sorted(json.loads((tmp_path / "checksums.json").read_text())["files"]) == ["config.json"]
    assert_same_model(model, EngramLM.from_pretrained(tmp_path).eval())


def _keep_edit(path, name):
    """Accept a deliberate edit of ``name``, as the checksum error says: remove its entry from checksums.json."""
    manifest = json.loads((path / "checksums.json").read_text())
    del manifest["files"][name]
    (path / "checksums.json").write_text(json.dumps(manifest))


def _edit_config(path, edit):
    data = json.loads((path / "config.json").read_text())
    edit(data)
    (path / "config.json").write_text(json.dumps(data))
    _keep_edit(path, "config.json")


def test_changed_hashing_is_refused(tmp_path):
    trained_like().save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda d: d["model"]["engram"].update(seed=1))
    with pytest.raises(ValueError, match=r"refusing to load .*multipliers: weights .* now .*; seed: weights 0, now 1"):
        EngramLM.from_pretrained(tmp_path)


def test_tampered_fingerprint_is_refused(tmp_path):
    trained_like().save_pretrained(tmp_path)
    _edit_config(tmp_path, lambda d: d["engram_fingerprint"].update(tokenizer_sha256="0" * 64))
    with pytest.raises(ValueError, match="tokenizer_sha256: weights '0000"):
        EngramLM.from_pretrained(tmp_path)


def _save_with_fingerprint(model, path, monkeypatch, edit):
    """Save ``model`` as if its hasher's fingerprint were ``edit(fingerprint)`` (older code, another variant)."""
    fingerprint = NgramHasher.fingerprint
    with monkeypatch.context() as patch:
        patch.setattr(NgramHasher, "fingerprint", lambda hasher: edit(fingerprint(hasher)))
        model.save_pretrained(path)


def test_weights_saved_before_variants_load_as_demo(tmp_path, monkeypatch):
    model = trained_like()
    _save_with_fingerprint(model, tmp_path, monkeypatch, lambda f: {k: v for k, v in f.items() if k != "variant"})
    assert "variant" not in json.loads((tmp_path / "config.json").read_text())["engram_fingerprint"]
    assert_same_model(model, EngramLM.from_pretrained(tmp_path).eval())


def test_tables_of_another_variant_are_refused(tmp_path, monkeypatch):
    _save_with_fingerprint(trained_like(), tmp_path, monkeypatch, lambda f: {**f, "variant": "deepseek-v4.1"})
    with pytest.raises(ValueError, match="variant: weights 'deepseek-v4.1', now 'demo'"):
        EngramLM.from_pretrained(tmp_path)


def test_weights_without_engram_refused_for_engram_config(tmp_path):
    trained_like(engram=False).save_pretrained(tmp_path)
    baseline_config = json.loads((tmp_path / "config.json").read_text())
    trained_like().save_pretrained(tmp_path / "with")
    engram_config = json.loads((tmp_path / "with" / "config.json").read_text())
    baseline_config["model"]["engram"] = engram_config["model"]["engram"]
    (tmp_path / "config.json").write_text(json.dumps(baseline_config))
    _keep_edit(tmp_path, "config.json")
    with pytest.raises(ValueError, match="weights have no Engram tables"):
        EngramLM.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        EngramLM.from_pretrained(tmp_path)
    trained_like().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        EngramLM.from_pretrained(tmp_path)


def _flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _data_offset(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("shard_bytes", [None, 2_000_000], ids=["single", "sharded"])
def test_flipped_byte_in_dense_weights_is_refused(tmp_path, shard_bytes):
    model = trained_like()
    model.save_pretrained(tmp_path, **({} if shard_bytes is None else {"max_shard_bytes": shard_bytes}))
    weights = sorted(tmp_path.glob("model*.safetensors"))[-1]
    offset = _data_offset(weights) + 1000
    _flip_byte(weights, offset)
    with pytest.raises(FileIntegrityError, match=f"{weights}: chunk 0 \\(data bytes 0:.*fails its CRC-32 check"):
        EngramLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_changed_json_file_is_refused(tmp_path, name):
    trained_like().save_pretrained(tmp_path, max_shard_bytes=2_000_000)
    path = tmp_path / name
    text = path.read_text()
    path.write_text(text.replace("1", "2", 1))  # same size: one digit changed
    with pytest.raises(FileIntegrityError, match=f"{path}: chunk 0 \\(data bytes 0:{len(text)}\\) fails its CRC-32"):
        EngramLM.from_pretrained(tmp_path)


def test_folders_saved_before_checksums_still_load(tmp_path):
    """Back-compat: weights without checksum metadata and no checksums.json load unchecked."""
    model = trained_like()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if not k.startswith("engram_crc")}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    save_file(state, str(weights), metadata=metadata)
    (tmp_path / "checksums.json").unlink()
    assert_same_model(model, EngramLM.from_pretrained(tmp_path).eval())
