import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engram.storage.checksums import (CHECKSUMS_NAME, FileIntegrityError, chunk_crc32, load_safetensors,
                                      record_checksums, safetensors_checksums, verify_recorded, verify_safetensors,
                                      write_safetensors)


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(7, 5, generator=gen),
        "half": torch.randn(3, generator=gen).to(torch.bfloat16),  # odd byte count before wider tensors
        "step": torch.tensor(12, dtype=torch.int64),  # 0-dim
        "rng": torch.randint(0, 256, (33,), dtype=torch.uint8, generator=gen),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "fp8": torch.randn(6, generator=gen).to(torch.float8_e4m3fn),
    }


def test_chunk_crc32_is_independent_of_how_the_bytes_are_split():
    data = bytes(range(256)) * 5
    whole = chunk_crc32([memoryview(data)], chunk_bytes=100)
    pieces = [memoryview(data)[a:b] for a, b in [(0, 3), (3, 3), (3, 250), (250, 1280)]]
    assert chunk_crc32(pieces, chunk_bytes=100, workers=1) == whole and len(whole) == 13
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int, got 0"):
        chunk_crc32([memoryview(data)], chunk_bytes=0)


def test_round_trip_readable_by_safetensors(tmp_path):
    tensors = mixed_tensors()
    path = tmp_path / "state.safetensors"
    write_safetensors(path, tensors, metadata={"note": "x"}, chunk_bytes=16)
    for loaded in (load_safetensors(path), load_file(str(path))):
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            bits = loaded[name].reshape(-1).view(torch.uint8)  # exact, NaNs and FP8 included
            assert (loaded[name].dtype, loaded[name].shape) == (tensor.dtype, tensor.shape), name
            assert torch.equal(bits, tensor.reshape(-1).view(torch.uint8))
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["note"] == "x"
    assert verify_safetensors(path)


def test_flipped_byte_names_the_file_range_and_tensor(tmp_path):
    path = tmp_path / "optimizer.safetensors"
    write_safetensors(path, {"a": torch.zeros(100), "b": torch.ones(100)}, chunk_bytes=64)  # a: 0:400, b: 400:800
    sums, spans = safetensors_checksums(path)
    assert spans == {"a": (0, 400), "b": (400, 800)}
    flip_byte(path, sums.data_offset + 450)  # chunk 7: data bytes 448:512, inside b
    start = sums.data_offset + 448
    expected = (f"{path}: chunk 7 \\(data bytes 448:512, file bytes {start}:{start + 64}, tensors b\\) fails its "
                "CRC-32 check")
    for load in (verify_safetensors, load_safetensors):
        with pytest.raises(FileIntegrityError, match=expected):
            load(path)


def test_files_without_checksums_load_unchecked(tmp_path):
    """Back-compat: files written before checksums (or by other code) load as they are."""
    path = tmp_path / "old.safetensors"
    save_file({"a": torch.arange(4.0)}, str(path))
    assert safetensors_checksums(path)[0] is None and not verify_safetensors(path)
    assert torch.equal(load_safetensors(path)["a"], torch.arange(4.0))


@pytest.mark.parametrize("change", [lambda size: size - 3, lambda size: size + 2], ids=["truncated", "extra"])
def test_file_size_must_match_the_header(tmp_path, change):
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"a": torch.randn(10)})
    size = path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data[:change(size)] if change(size) < size else data + b"xx")
    with pytest.raises(FileIntegrityError, match=f"{path}: (truncated|has 2 extra bytes): expected {size} bytes"):
        load_safetensors(path)


def test_write_refuses_bad_input(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="'x' must be a contiguous CPU tensor"):
        write_safetensors(path, {"x": torch.randn(3, 2).t()})
    with pytest.raises(ValueError, match="metadata key 'engram_crc32' is reserved"):
        write_safetensors(path, {"x": torch.randn(2)}, metadata={"engram_crc32": "[]"})
    with pytest.raises(ValueError, match="complex64 has no safetensors name"):
        write_safetensors(path, {"x": torch.randn(2, dtype=torch.complex64)})
    assert not path.exists()


def test_recorded_files_are_checked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layers": 4}))
    (tmp_path / "other.json").write_text("{}")
    record_checksums(tmp_path, ["config.json"])
    verify_recorded(tmp_path, ["config.json", "other.json", "absent.json"])
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 65, "n_layers": 4}))  # a flipped digit
    with pytest.raises(FileIntegrityError, match=f"{tmp_path / 'config.json'}: chunk 0 \\(data bytes 0:30\\) fails "
                                                 "its CRC-32 check.*remove its entry from checksums.json"):
        verify_recorded(tmp_path, ["config.json"])
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileIntegrityError, match="config.json: 2 bytes, checksums.json recorded 30"):
        verify_recorded(tmp_path, ["config.json"])


def test_record_keeps_other_entries_and_drops_deleted_files(tmp_path):
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(name)
    record_checksums(tmp_path, ["a.json", "b.json"])
    (tmp_path / "b.json").unlink()
    (tmp_path / "c.json").write_text("c")
    record_checksums(tmp_path, ["c.json"])
    assert sorted(json.loads((tmp_path / CHECKSUMS_NAME).read_text())["files"]) == ["a.json", "c.json"]
    (tmp_path / CHECKSUMS_NAME).write_text("{not json")
    with pytest.raises(FileIntegrityError, match="checksums.json is malformed"):
        verify_recorded(tmp_path, ["a.json"])
    record_checksums(tmp_path, ["a.json"])  # a new save starts a broken manifest afresh
    verify_recorded(tmp_path, ["a.json", "c.json"])


def test_corrupt_chunk_of_many_tensors_names_the_first_ones(tmp_path):
    path = tmp_path / "many.safetensors"
    write_safetensors(path, {f"t{i}": torch.full((2,), float(i)) for i in range(5)})  # one chunk of 40 bytes
    flip_byte(path, safetensors_checksums(path)[0].data_offset + 39)
    with pytest.raises(FileIntegrityError, match="tensors t0, t1, t2 and 2 more\\) fails its CRC-32 check"):
        verify_safetensors(path)
