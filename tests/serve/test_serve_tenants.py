"""The tenants file: keys shown once and stored hashed, checked entries, constant-time lookups; the CLI helper."""

import argparse
import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch

from engram.memory import MemoryPatch, save_patch
from engram.cli import serve
from engram.serve.tenants import TenantRegistry, add_tenant, hash_key, new_key, read_tenants

from memory.patch_helpers import write_raw_patch


def no_overlay(path: Path):
    raise AssertionError(f"no patch should be loaded, asked for {path}")


def row_patch(path: Path, dense: bool = False) -> Path:
    """A small valid patch file (its base is no real model: add_tenant cannot check that, the server does)."""
    return save_patch(MemoryPatch({0: (torch.tensor([1, 5]), torch.randn(2, 8))}, "sha256:" + "ab" * 32,
                                  {"norm.weight": torch.ones(4)} if dense else {}), path)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_add_tenant_creates_the_file_with_an_admin_key_and_stores_only_hashes(tmp_path):
    path = tmp_path / "tenants.toml"
    key_a, admin = add_tenant(path, "acme")
    key_b, no_admin = add_tenant(path, "globex")
    assert admin is not None and no_admin is None
    assert len({key_a, key_b, admin}) == 3 and all(k.startswith("ek-") and len(k) == 46 for k in (key_a, key_b, admin))
    text = path.read_text()
    for key in (key_a, key_b, admin):
        assert key not in text and key[3:] not in text
        assert hashlib.sha256(key.encode()).hexdigest() in text
    parsed = read_tenants(path)
    assert list(parsed.tenants) == ["acme", "globex"] and parsed.admin_key_hash == hash_key(admin)

    registry = TenantRegistry.from_file(path, no_overlay)
    assert registry.identify(key_a).name == "acme" and registry.identify(key_b).name == "globex"
    assert registry.identify(admin) is None and registry.is_admin(admin) and not registry.is_admin(key_a)
    assert registry.identify(new_key()) is None and registry.identify("") is None


def test_add_tenant_refusals(tmp_path):
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme")
    before = path.read_text()
    with pytest.raises(ValueError, match="tenant 'acme' exists already"):
        add_tenant(path, "acme")
    for bad in ("", "-lead", "has space", "x" * 65, "dot.ted", 'quo"te'):
        with pytest.raises(ValueError, match="tenant name must be"):
            add_tenant(path, bad)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        add_tenant(path, "other", patch=tmp_path / "absent.safetensors")
    assert path.read_text() == before


def test_patch_paths_are_stored_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "patches").mkdir()
    row_patch(tmp_path / "patches" / "p.safetensors")
    monkeypatch.chdir(tmp_path)
    add_tenant("conf/tenants.toml", "acme", patch="patches/p.safetensors")
    assert 'patch = "../patches/p.safetensors"' in (tmp_path / "conf" / "tenants.toml").read_text()
    parsed = read_tenants(tmp_path / "conf" / "tenants.toml")
    assert parsed.patch_path(parsed.tenants["acme"]).resolve() == (tmp_path / "patches" / "p.safetensors").resolve()


@pytest.mark.parametrize("body, message", [
    ('[tenants.a]\nkey_hash = "sha256:' + "0" * 64 + '"\n', r"missing \[admin\] key_hash"),
    ('[admin]\nkey_hash = "md5:abc"\n', "key_hash must be 'sha256:'"),
    ('[admin]\nkey_hash = "sha256:' + "A" * 64 + '"\n', "64 lowercase hex digits"),
    ('[admin]\nkey_hash = "sha256:' + "0" * 64 + '"\n[tenants.a]\nkey_hash = "sha256:' + "0" * 64 + '"\n',
     "share one key hash"),
    ('[admin]\nkey_hash = "sha256:' + "0" * 64 + '"\n[tenants.a]\nkey_hash = "sha256:' + "1" * 64 + '"\nkey = "x"\n',
     r"\[tenants.a\]: unknown keys \['key'\]"),
    ('users = 1\n[admin]\nkey_hash = "sha256:' + "0" * 64 + '"\n', r"unknown top-level keys \['users'\]"),
    ("[admin\n", "not valid TOML"),
    ('tenants = 3\n[admin]\nkey_hash = "sha256:' + "0" * 64 + '"\n', r"tenants must be tables \[tenants.NAME\]"),
    ('[admin]\nkey_hash = "sha256:' + "0" * 64 + '"\n[tenants."a b"]\nkey_hash = "sha256:' + "1" * 64 + '"\n',
     r"\[tenants.a b\]: tenant name must be"),
], ids=["no-admin", "scheme", "uppercase", "shared-hash", "unknown-key", "unknown-table", "bad-toml", "tenants-value",
        "bad-name"])
def test_bad_tenants_files_are_refused_with_the_entry(tmp_path, body, message):
    path = tmp_path / "tenants.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        read_tenants(path)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="engram")
    serve.add_parser(parser.add_subparsers(dest="command", required=True))
    return serve.run(parser.parse_args(list(argv)))


def test_cli_add_tenant_prints_each_key_once(tmp_path, capsys):
    path = tmp_path / "tenants.toml"
    assert run_cli("serve", "add-tenant", "--tenants", str(path), "--name", "acme") == 0
    first = capsys.readouterr().out
    assert "admin key" in first and "tenant 'acme' key" in first
    assert run_cli("serve", "add-tenant", "--tenants", str(path), "--name", "globex") == 0
    second = capsys.readouterr().out
    assert "admin key" not in second
    key = second.strip().rsplit(" ", 1)[-1]
    assert TenantRegistry.from_file(path, no_overlay).identify(key).name == "globex"


def test_cli_serve_needs_checkpoint_and_tenants():
    with pytest.raises(ValueError, match="--checkpoint DIR and --tenants FILE"):
        run_cli("serve", "--tenants", "t.toml")


def test_cli_serves_on_loopback_by_default():
    parser = argparse.ArgumentParser(prog="engram")
    serve.add_parser(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["serve", "--checkpoint", "c", "--tenants", "t"]).host == "127.0.0.1"


def test_a_new_tenants_file_is_private(tmp_path):
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme")
    assert mode(path) == 0o600


@pytest.mark.parametrize("file_mode, who", [(0o620, "its group"), (0o602, "others"), (0o666, "its group and others")],
                         ids=["group", "others", "both"])
def test_a_tenants_file_others_may_write_is_refused(tmp_path, file_mode, who):
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme")
    before = path.read_text()
    path.chmod(file_mode)
    message = f"refusing a tenants file that {who} may write \\(mode {file_mode:#o}\\).*chmod go-w"
    with pytest.raises(ValueError, match=message):
        read_tenants(path)
    with pytest.raises(ValueError, match=message):
        TenantRegistry.from_file(path, no_overlay)
    with pytest.raises(ValueError, match=message):
        add_tenant(path, "globex")
    assert path.read_text() == before and mode(path) == file_mode


def test_add_tenant_keeps_the_mode_and_the_symlink(tmp_path):
    real = tmp_path / "conf" / "tenants.toml"
    real.parent.mkdir()
    add_tenant(real, "acme")
    real.chmod(0o640)
    link = tmp_path / "tenants.toml"
    link.symlink_to(real)
    key, _ = add_tenant(link, "globex")
    assert link.is_symlink() and link.resolve() == real.resolve() and mode(real) == 0o640
    assert TenantRegistry.from_file(real, no_overlay).identify(key).name == "globex"


def raw_patch(path: Path, values: torch.Tensor, header: dict[str, str] | None = None) -> Path:
    """One row of ``values`` written around MemoryPatch's checks (a valid checksum)."""
    header = {"base_fingerprint": "sha256:x", "metadata": "{}"} if header is None else header
    return write_raw_patch(path, {"layers.0.rows": torch.tensor([1]), "layers.0.values": values}, header)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is not a file"),
    (lambda p: p.write_bytes(row_patch(p).read_bytes()[:-10]), "refused: .*truncated or corrupt"),
    (lambda p: p.write_bytes(b"not a patch"), "refused: .*truncated or corrupt"),
    (lambda p: raw_patch(p, torch.full((1, 8), torch.nan)), "refused: .*NaN or infinite"),
    (lambda p: raw_patch(p, torch.ones(1, 8).to(torch.float8_e4m3fn)), "refused: .*float8_e4m3fn"),
    (lambda p: raw_patch(p, torch.ones(1, 8), {"metadata": "{}"}), r"refused: .*lacks \['base_fingerprint'\]"),
    (lambda p: row_patch(p, dense=True), "refused: gate-tuned patches cannot be served as overlays"),
], ids=["folder", "truncated", "not-a-patch", "nan", "fp8", "no-fingerprint", "gate-tuned"])
def test_add_tenant_validates_the_patch(tmp_path, make, message):
    path = tmp_path / "tenants.toml"
    add_tenant(path, "acme", patch=row_patch(tmp_path / "good.patch"))
    before = path.read_text()
    bad = tmp_path / "bad.patch"
    make(bad)
    with pytest.raises(ValueError, match=message):
        add_tenant(path, "globex", patch=bad)
    assert path.read_text() == before
