"""Engram tables served from Mooncake Store (placement ``store``): a real ``mooncake_master`` and holder processes
on free loopback ports, started here.

Skipped, with the reason, only where the optional library cannot load (``pip install -e ".[store]"`` and Debian's
``libibverbs1 libnl-3-200 libnl-route-3-200``); .ci/run installs both and sets ENGRAM_REQUIRE_MOONCAKE, so in CI
these tests run or fail.
"""

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram.cli import main as engram_main
from engram.model import EngramLM
from engram.storage.mooncake import SharedClient, StoreConfig, free_port, load_mooncake, start_master
from engram.storage.published import LayerTable, PublishedTables, head_keys, publish_tables, read_manifest
from engram.storage.remote import StoreReadError

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from lm_helpers import assert_same_outputs, saved_small_model, small_config  # noqa: E402

os.environ.setdefault("GLOG_minloglevel", "2")  # the library's INFO/WARNING lines on stderr
try:
    load_mooncake()
    MISSING = None
except ImportError as err:
    MISSING = str(err)
if MISSING and os.environ.get("ENGRAM_REQUIRE_MOONCAKE"):
    raise RuntimeError(f"ENGRAM_REQUIRE_MOONCAKE is set but Mooncake Store cannot load: {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"Mooncake Store is not installed: {MISSING}")


class Holder:
    """An ``engram store hold`` process lending the store 32 MiB."""

    def __init__(self, master: str, log: Path):
        self.process = subprocess.Popen([sys.executable, "-m", "engram", "store", "hold", "--master", master,
                                         "--mib", "32"], stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        line = self.process.stdout.readline()
        assert line.startswith("holding 32 MiB"), (line, log.read_text()[-2000:])

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    log = tmp_path_factory.mktemp("mooncake") / "master.log"
    with log.open("w") as out, start_master(log=out) as running:
        yield running.address


@pytest.fixture(scope="module")
def holder(master, tmp_path_factory):
    running = Holder(master, tmp_path_factory.mktemp("holder") / "holder.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    return saved_small_model(folder, hc_mult=4), folder


@pytest.fixture(scope="module")
def published(master, holder, saved):
    """``saved`` published under the default prefix."""
    assert engram_main(["store", "publish", "--checkpoint", str(saved[1]), "--master", master]) == 0
    return saved


def _ids(seed, batch=3, length=11):
    return torch.randint(3, 128_815, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_tables(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sizes = [37, 41, 43]
    if dtype == torch.uint8:
        table = torch.randint(0, 256, (sum(sizes), 66), dtype=torch.uint8, generator=generator)
    else:
        table = torch.randn(sum(sizes), 24, generator=generator).to(dtype)
    return table, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_fetch_equals_the_plain_gather_bit_for_bit(master, holder, dtype):
    """The reference twin: ``table[rows]`` on random rows (repeats, every head, any shape), on a CPU target."""
    table, sizes = _random_tables(dtype)
    prefix = f"twin-{str(dtype).removeprefix('torch.')}"
    config = StoreConfig(master)
    assert publish_tables(config, {5: LayerTable(table, sizes)}, {"seed": 1}, "float", prefix)
    tables = PublishedTables(config, prefix)
    store = tables.open_layer(5, "float")
    tables.close()
    try:
        for seed in range(3):
            rows = torch.randint(0, table.shape[0], (4, 7, 3), generator=torch.Generator().manual_seed(seed))
            pending = store.fetch(rows, "cpu")
            assert torch.equal(pending.wait(), table[rows])
        assert store.fetch(torch.empty(0, 3, dtype=torch.int64), "cpu").wait().shape == (0, 3, table.shape[1])
        with pytest.raises(IndexError, match=r"row 121 .* out of range \[0, 121\)"):
            store.fetch(torch.tensor([0, 121]), "cpu")
        assert store.rows_requested == 3 * 84 and store.rows_transferred < store.rows_requested  # distinct rows once
    finally:
        store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fetch_onto_a_gpu_equals_the_plain_gather(master, holder, dtype):
    table, sizes = _random_tables(dtype, seed=3)
    prefix = f"gpu-{str(dtype).removeprefix('torch.')}"
    config = StoreConfig(master)
    publish_tables(config, {1: LayerTable(table, sizes)}, {"seed": 1}, "float", prefix)
    tables = PublishedTables(config, prefix)
    with tables.open_layer(1, "float") as store:
        rows = torch.randint(0, table.shape[0], (2, 9, 3), device="cuda")
        assert torch.equal(store.fetch(rows, "cuda").wait().cpu(), table[rows.cpu()])
    tables.close()


def test_objects_follow_mooncakes_engram_store_layout(published, master):
    """fp32 rows published under prefix ``engram`` are what Mooncake's own ``EngramStore`` (the vLLM / SGLang
    reader) reads: one object per layer and head, rows back to back."""
    mooncake = load_mooncake()
    model, _ = published
    embedding = model.blocks[2].engram.multi_head_embedding
    shared = SharedClient(StoreConfig(master))
    try:
        config = mooncake.EngramStoreConfig()
        config.table_vocab_sizes, config.embedding_dim = embedding.table_sizes, embedding.head_dim
        reader = mooncake.EngramStore(2, config, shared.client)
        assert reader.get_store_keys() == head_keys("engram", 2, embedding.num_heads)
        per_head = torch.stack([torch.randint(0, size, (2, 5)) for size in embedding.table_sizes], dim=-1)
        expected = embedding.weight.detach()[embedding.flat_row_ids(per_head)]  # [B, T, H, D]
        assert torch.equal(torch.from_numpy(reader.lookup(per_head.numpy())), expected)
    finally:
        shared.release()


@pytest.mark.parametrize("cache_rows", [0, 64], ids=["no-cache", "cache"])
def test_store_placement_gives_the_device_logits_and_generations(published, master, cache_rows):
    model, folder = published
    placed = EngramLM.from_pretrained(folder, engram_placement="store", store_master=master,
                                      engram_cache_rows=cache_rows).eval()
    expected = "cache" if cache_rows else "store"
    assert {b.engram.multi_head_embedding.placement for b in placed.blocks if b.engram} == {expected}
    assert "multi_head_embedding.weight" not in " ".join(placed.state_dict())
    assert_same_outputs(placed, model, _ids, forwards=2, new_tokens=4)
    if cache_rows:  # refreshed every 8 fetches: then the rows read again are hits
        for _ in range(8):
            placed(_ids(0))
        assert placed.blocks[0].engram.multi_head_embedding.store.stats()["hits"] > 0
    table = placed.blocks[2].engram.multi_head_embedding.table()  # read whole from the store: for saving, hashing
    assert torch.equal(table, model.blocks[2].engram.multi_head_embedding.weight.detach())


def test_a_model_without_table_files_reads_the_store(published, master, tmp_path):
    """The edge process: the backbone's folder without its tables."""
    model, folder = published
    edge = tmp_path / "edge"
    edge.mkdir()
    for path in folder.iterdir():
        if not path.name.startswith("engram-layer-"):
            (edge / path.name).write_bytes(path.read_bytes())
    placed = EngramLM.from_pretrained(edge, engram_placement="store", store_master=master).eval()
    ids = _ids(11)
    assert torch.equal(placed(ids).logits, model(ids).logits)


def test_publishing_again_is_a_no_op_and_other_tables_need_replace(published, master, tmp_path, capsys):
    model, folder = published
    assert engram_main(["store", "publish", "--checkpoint", str(folder), "--master", master]) == 0
    assert "already published" in capsys.readouterr().out
    torch.manual_seed(1)
    other = EngramLM(small_config(hc_mult=4)).eval()  # same hashing, other weights
    other.save_pretrained(tmp_path / "other")
    argv = ["store", "publish", "--checkpoint", str(tmp_path / "other"), "--master", master, "--prefix", "swap"]
    assert engram_main(argv) == 0
    assert engram_main(["store", "publish", "--checkpoint", str(folder), "--master", master, "--prefix", "swap"]) == 2
    assert "holds other Engram tables under prefix 'swap'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="made from other weights than .*engram-layer-0.safetensors"):
        EngramLM.from_pretrained(folder, engram_placement="store", store_master=master, store_prefix="swap")
    assert engram_main(["store", "publish", "--checkpoint", str(folder), "--master", master, "--prefix", "swap",
                        "--replace"]) == 0
    placed = EngramLM.from_pretrained(folder, engram_placement="store", store_master=master, store_prefix="swap")
    assert torch.equal(placed.eval()(_ids(2)).logits, model(_ids(2)).logits)
    assert engram_main(["store", "show", "--master", master, "--prefix", "swap"]) == 0
    assert "layer 0: 4 heads, 1272 rows" in capsys.readouterr().out


def test_a_model_refuses_a_store_of_other_hashing(published, master, tmp_path):
    config = small_config(hc_mult=4)
    config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, seed=1))
    torch.manual_seed(0)
    EngramLM(config).save_pretrained(tmp_path / "reseeded")
    with pytest.raises(ValueError, match=r"hashing differs from the model's .*multipliers: store .*seed: store 0, "
                                         r"model 1"):
        EngramLM.from_pretrained(tmp_path / "reseeded", engram_placement="store", store_master=master)
    with pytest.raises(ValueError, match="no Engram tables are published under prefix 'nothing'"):
        EngramLM.from_pretrained(published[1], engram_placement="store", store_master=master, store_prefix="nothing")


def test_fp8_tables_are_published_and_read_as_fp8(master, holder, tmp_path):
    config = small_config(hc_mult=1, use_moe=False)
    config.engram.n_embed_per_ngram, config.engram.n_head_per_ngram = 64, 2  # head_dim 32: FP8 rows need it
    torch.manual_seed(0)
    EngramLM(config).save_pretrained(tmp_path / "fp8-able")
    folder = tmp_path / "fp8-able"
    argv = ["store", "publish", "--checkpoint", str(folder), "--master", master, "--prefix", "fp8", "--table-format",
            "fp8"]
    assert engram_main(argv) == 0
    placed = EngramLM.from_pretrained(folder, engram_placement="store", store_master=master, store_prefix="fp8",
                                      engram_table_format="fp8").eval()
    reference = EngramLM.from_pretrained(folder, engram_table_format="fp8").eval()
    assert placed.blocks[0].engram.multi_head_embedding.store.dtype == torch.uint8
    assert torch.equal(placed(_ids(4)).logits, reference(_ids(4)).logits)
    with pytest.raises(ValueError, match="hold fp8 rows and the model reads float rows"):
        EngramLM.from_pretrained(folder, engram_placement="store", store_master=master, store_prefix="fp8")


@pytest.mark.slow  # two more processes importing torch
def test_several_processes_read_one_published_copy(published, master, tmp_path):
    model, folder = published
    ids = _ids(5)
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch\nfrom engram.model import EngramLM\n"
              "model = EngramLM.from_pretrained(sys.argv[1], engram_placement='store', store_master=sys.argv[2])\n"
              "torch.save(model.eval()(torch.load(sys.argv[3])).logits, sys.argv[4])\n")
    readers = [subprocess.Popen([sys.executable, "-c", script, str(folder), master, str(tmp_path / "ids.pt"),
                                 str(tmp_path / f"logits-{i}.pt")], stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    for reader in readers:
        assert reader.wait(300) == 0, reader.stderr.read()[-3000:]
    expected = model(ids).logits
    for i in range(2):
        assert torch.equal(torch.load(tmp_path / f"logits-{i}.pt"), expected)


def test_a_missing_object_is_an_error_naming_it_never_zero_rows(master, holder):
    table, sizes = _random_tables(torch.float32, seed=7)
    config = StoreConfig(master)
    publish_tables(config, {3: LayerTable(table, sizes)}, {"seed": 3}, "float", "lossy")
    tables = PublishedTables(config, "lossy")
    store = tables.open_layer(3, "float")
    shared = SharedClient(config)
    try:
        assert shared.client.remove("lossy:l3:h1", True) == 0
        with pytest.raises(StoreReadError, match=r"row 4 of 'lossy:l3:h1' \(table row 41, head 1\) .* "
                                                 r"OBJECT_NOT_FOUND \(-704\)"):
            store.fetch(torch.tensor([[0, 41, 80]]), "cpu").wait()
        assert torch.equal(store.fetch(torch.tensor([2, 80]), "cpu").wait(), table[[2, 80]])  # the others still read
        with pytest.raises(ValueError, match=r"lost objects \['lossy:l3:h1'\]"):
            tables.open_layer(3, "float")
    finally:
        store.close()
        tables.close()
        shared.release()


@pytest.mark.slow  # its own master and two holders; a read without a master fails after ~13 s of RPC retries
def test_a_stopped_holder_or_master_fails_the_read_with_a_clear_error(saved, tmp_path):
    """Holder gone: the store no longer has the rows. Master gone: nothing can be located. Both raise."""
    model, folder = saved
    with (tmp_path / "master.log").open("w") as log, start_master(log=log) as master:
        holder = Holder(master.address, tmp_path / "holder.log")
        engram_main(["store", "publish", "--checkpoint", str(folder), "--master", master.address])
        placed = EngramLM.from_pretrained(folder, engram_placement="store", store_master=master.address).eval()
        assert torch.equal(placed(_ids(1)).logits, model(_ids(1)).logits)
        holder.stop()
        with pytest.raises(StoreReadError, match="engram:l0:h.* OBJECT_NOT_FOUND .* holder process"):
            placed(_ids(1))
        holder = Holder(master.address, tmp_path / "holder2.log")
        engram_main(["store", "publish", "--checkpoint", str(folder), "--master", master.address])
        assert torch.equal(placed(_ids(3)).logits, model(_ids(3)).logits)  # the same model reads the new copy
        master.stop()
        started = time.monotonic()
        with pytest.raises(StoreReadError, match="RPC_FAIL .* the master cannot be reached"):
            placed(_ids(2))
        assert time.monotonic() - started < 30
        holder.process.kill()  # a graceful stop would retry unmounting from the dead master for ~20 s
        holder.process.wait()


def test_serve_reads_the_store_and_applies_tenant_patches(published, master, tmp_path):
    """An engine on store tables answers as one on device tables, a tenant's patch (an overlay) included: the patch,
    made for the device model, is accepted by the store model (same fingerprint, its tables read whole once)."""
    from engram.serve.engine import Engine
    from engram.tokenizer import load_tokenizer

    from serve.serve_helpers import overlay_for, write_patch

    model, folder = published
    placed = EngramLM.from_pretrained(folder, engram_placement="store", store_master=master)
    tokenizer = load_tokenizer(model.cfg.tokenizer)
    answers = []
    for served in (model, placed):
        with Engine(served, tokenizer, max_tokens_limit=8) as engine:
            request = engine.prepare("the zebra code is", max_tokens=6, temperature=0)
            patch = tmp_path / "tenant.patch"
            if not patch.exists():
                write_patch(model, patch, overlay_for(model, request.prompt_ids, seed=0))
            tenant = engine.prepare("the zebra code is", max_tokens=6, temperature=0,
                                    overlay=engine.load_overlay(patch))
            answers.append((engine.complete(request).text, engine.complete(tenant).text))
    assert answers[0] == answers[1] and answers[0][0] != answers[0][1]


def test_serve_flags_choose_the_store(master):
    from engram.cli import build_parser
    from engram.cli.serve import placement_options

    parse = build_parser().parse_args
    base = ["serve", "--checkpoint", "c", "--tenants", "t"]
    assert placement_options(parse(base)) == dict(engram_placement="device", engram_cache_rows=0)
    assert placement_options(parse([*base, "--engram-placement", "store", "--store-master", master,
                                    "--engram-cache-rows", "128"])) == dict(
        engram_placement="store", engram_cache_rows=128, store_master=master, store_prefix="engram")
    with pytest.raises(ValueError, match="needs --store-master"):
        placement_options(parse([*base, "--engram-placement", "store"]))
    with pytest.raises(ValueError, match="goes with --engram-placement store"):
        placement_options(parse([*base, "--store-master", master]))


def test_manifest_is_read_back_as_published(published, master):
    shared = SharedClient(StoreConfig(master))
    try:
        manifest = read_manifest(shared.client, "engram", master)
        assert read_manifest(shared.client, "absent", master) is None
    finally:
        shared.release()
    model, _ = published
    assert manifest.row_format == "float" and manifest.dtype == "float32" and manifest.row_width == 8
    assert manifest.table_sizes["0"] == model.blocks[0].engram.multi_head_embedding.table_sizes
    assert manifest.fingerprint == model.hasher.fingerprint()



def test_no_master_is_a_clear_error_within_seconds(capsys):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Mooncake Store master answers at {address}"):
        PublishedTables(address)
    assert engram_main(["store", "show", "--master", address]) == 2
    assert f"no Mooncake Store master answers at {address}" in capsys.readouterr().err
    assert time.monotonic() - started < 30
    with pytest.raises(ValueError, match="master must be 'host:port', got 'nowhere'"):
        StoreConfig("nowhere")
    with pytest.raises(ValueError, match="segment_bytes must be 0 .* or at least 16777216"):
        StoreConfig(address, segment_bytes=1024)
