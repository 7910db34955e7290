"""Tenants of the server: who may call it, with which key, reading which memory patch.

The tenants file is TOML::

    [admin]
    key_hash = "sha256:9f86d0..."          # the admin key: /admin/*, /metrics

    [tenants.acme]
    key_hash = "sha256:2c26b4..."
    patch = "patches/acme.safetensors"     # optional; relative paths start at the tenants file's folder

Only hashes are stored. Keys are made here (:func:`new_key`): 256 random bits, never chosen by a person, so a
plain SHA-256 of the key is enough. Salting and slow hashes (scrypt, PBKDF2) defend low-entropy passwords
against dictionary and brute-force search; a 256-bit random key has nothing to search, and a slow hash would
cost every request tens of milliseconds of CPU. GitHub and Stripe store their API tokens the same way. The
``sha256:`` prefix names the scheme, so another can be added later; unknown schemes are refused.

A presented key is hashed once and compared with every stored hash in constant time (``hmac.compare_digest``,
no early exit), so the response time says nothing about which hash, or how much of one, matched.

Whoever can write the file can add a key of their own, so a file that its group or others may write is refused
(on POSIX systems). :func:`add_tenant` replaces the file atomically and keeps its mode (a new file is made
``0o600``); a symlink is followed, its target replaced and the link kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engram.atomic import atomic_path
from engram.memory.patch import load_patch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from engram.model.overlay import RowOverlay

HASH_SCHEME = "sha256"
KEY_PREFIX = "ek-"  # lets secret scanners and people recognise an Engram key
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NEW_FILE_MODE = 0o600  # a tenants file made by add_tenant: its owner alone reads and writes it


def new_key() -> str:
    """A fresh API key: ``ek-`` followed by 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of ``key``: ``"sha256:<64 hex digits>"``."""
    return f"{HASH_SCHEME}:{hashlib.sha256(key.encode()).hexdigest()}"


def _digest(key_hash: str, where: str) -> bytes:
    """The raw digest of a stored ``sha256:<hex>`` hash; ``ValueError`` naming ``where`` for anything else."""
    scheme, _, hex_digest = key_hash.partition(":")
    if scheme != HASH_SCHEME or not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
        raise ValueError(f"{where}: key_hash must be 'sha256:' followed by 64 lowercase hex digits, "
                         f"got {key_hash[:80]!r}")
    return bytes.fromhex(hex_digest)


def check_name(name: str) -> str:
    """``name`` if it is a valid tenant name (1-64 of ``A-Z a-z 0-9 _ -``, starting alphanumeric), else ValueError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"tenant name must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-', starting with a "
                         f"letter or digit; got {name!r}")
    return name


@dataclass(frozen=True)
class TenantEntry:
    """One tenant as the file states it."""

    name: str
    key_hash: str
    patch: str | None = None  # as written: a path, relative to the tenants file's folder unless absolute


@dataclass(frozen=True)
class TenantsFile:
    """The parsed tenants file; ``folder`` is where relative patch paths start."""

    admin_key_hash: str
    tenants: dict[str, TenantEntry]
    folder: Path

    def patch_path(self, entry: TenantEntry) -> Path | None:
        """``entry``'s patch as a path usable from the current directory (None without a patch)."""
        return self.folder / entry.patch if entry.patch is not None else None


def _check_not_shared_writable(path: Path) -> None:
    """``ValueError`` when the group or others may write ``path`` (a symlink's target): they could add a key."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(name for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others"))
                           if mode & bit)
        raise ValueError(f"{path}: refusing a tenants file that {who} may write (mode {mode:#o}): whoever writes it "
                         f"can add a key of their own; run `chmod go-w {path}`")


def read_tenants(path: str | os.PathLike[str]) -> TenantsFile:
    """Parse and check a tenants file; ``ValueError`` naming the file and the bad entry (or a file its group or
    others may write), FileNotFoundError if absent."""
    path = Path(path)
    _check_not_shared_writable(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    unknown = sorted(set(data) - {"admin", "tenants"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown} (expected [admin] and [tenants.NAME])")
    admin = data.get("admin")
    if not isinstance(admin, dict) or "key_hash" not in admin:
        raise ValueError(f"{path}: missing [admin] key_hash (make one with `engram serve add-tenant`)")
    _check_keys(admin, {"key_hash"}, f"{path}: [admin]")
    _digest(admin["key_hash"], f"{path}: [admin]")
    tables = data.get("tenants", {})
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: tenants must be tables [tenants.NAME], got {tables!r}")
    tenants: dict[str, TenantEntry] = {}
    for name, entry in tables.items():
        where = f"{path}: [tenants.{name}]"
        try:
            check_name(name)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if not isinstance(entry, dict) or "key_hash" not in entry:
            raise ValueError(f"{where}: missing key_hash")
        _check_keys(entry, {"key_hash", "patch"}, where)
        _digest(entry["key_hash"], where)
        patch = entry.get("patch")
        if patch is not None and (not isinstance(patch, str) or not patch):
            raise ValueError(f"{where}: patch must be a non-empty path string, got {patch!r}")
        tenants[name] = TenantEntry(name, entry["key_hash"], patch)
    hashes = [admin["key_hash"]] + [t.key_hash for t in tenants.values()]
    if len(set(hashes)) != len(hashes):
        raise ValueError(f"{path}: two entries share one key hash; every tenant and the admin need their own key")
    return TenantsFile(admin["key_hash"], tenants, path.parent)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (allowed: {sorted(allowed)})")


def _toml_string(value: str) -> str:
    # JSON's escapes (\" \\ \n \t \uXXXX ...) are all valid in a TOML basic string
    return json.dumps(value)


def write_tenants(path: str | os.PathLike[str], tenants_file: TenantsFile) -> None:
    """Write ``tenants_file`` to ``path`` atomically (comments of an earlier file are not kept).

    An existing file keeps its mode, a new one gets :data:`NEW_FILE_MODE`; a symlink is followed (its target is
    replaced, the link stays).
    """
    lines = ["# Engram server tenants: only key hashes are stored (see docs/serve.md).", "",
             "[admin]", f"key_hash = {_toml_string(tenants_file.admin_key_hash)}"]
    for entry in tenants_file.tenants.values():
        # names are checked to be TOML bare keys
        lines += ["", f"[tenants.{check_name(entry.name)}]", f"key_hash = {_toml_string(entry.key_hash)}"]
        if entry.patch is not None:
            lines.append(f"patch = {_toml_string(entry.patch)}")
    target = Path(os.path.realpath(path))
    mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else NEW_FILE_MODE
    with atomic_path(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
        os.chmod(tmp, mode)


def _check_patch_file(patch: Path) -> None:
    """Refuse a patch a server could not load: missing, not a file, corrupt, poisoned (NaN, FP8) or gate-tuned
    (``ValueError`` naming it; FileNotFoundError when absent). Its base model is checked when the server loads it."""
    if not patch.exists():
        raise FileNotFoundError(f"patch {patch} does not exist")
    if not patch.is_file():
        raise ValueError(f"patch {patch} is not a file")
    try:
        load_patch(patch).overlay()
    except ValueError as err:
        raise ValueError(f"patch {patch} refused: {err}") from None


def add_tenant(path: str | os.PathLike[str], name: str, patch: str | os.PathLike[str] | None = None
               ) -> tuple[str, str | None]:
    """Add tenant ``name`` to the tenants file at ``path`` (created, with an admin key, when absent).

    Returns ``(tenant_key, admin_key)``: the keys in clear, to be shown once; ``admin_key`` is None unless the
    file was created now. ``patch`` is a path from the current directory; the file stores it relative to its
    own folder. ``ValueError`` when the name is taken or invalid, the patch is refused (see
    :func:`_check_patch_file`) or the file may be written by its group or others; FileNotFoundError when the
    patch is missing. The file keeps its mode and stays behind its symlink (see :func:`write_tenants`).

    Example:
        >>> key, admin_key = add_tenant("tenants.toml", "acme")  # doctest: +SKIP
    """
    path = Path(path)
    check_name(name)
    admin_key = None
    if path.exists():
        current = read_tenants(path)
    else:
        admin_key = new_key()
        current = TenantsFile(hash_key(admin_key), {}, path.parent)
    if name in current.tenants:
        raise ValueError(f"{path}: tenant {name!r} exists already")
    stored_patch = None
    if patch is not None:
        _check_patch_file(Path(patch))
        stored_patch = Path(os.path.relpath(Path(patch).resolve(), path.parent.resolve())).as_posix()
    key = new_key()
    tenants = {**current.tenants, name: TenantEntry(name, hash_key(key), stored_patch)}
    write_tenants(path, TenantsFile(current.admin_key_hash, tenants, current.folder))
    return key, admin_key


@dataclass
class Tenant:
    """A tenant at run time: its key digest and the overlay its requests read (None: the base memory)."""

    name: str
    digest: bytes = field(repr=False)
    patch: Path | None = None
    overlay: RowOverlay | None = field(default=None, repr=False)


class TenantRegistry:
    """The tenants of a running server and their overlays; key checks in constant time.

    ``load_overlay`` turns a patch path into a :class:`RowOverlay` (``ValueError`` when refused); it runs here
    for every tenant whose entry names a patch, and at :meth:`set_patch`.
    """

    def __init__(self, tenants_file: TenantsFile, load_overlay: Callable[[Path], RowOverlay]):
        self._admin_digest = _digest(tenants_file.admin_key_hash, "[admin]")
        self._load_overlay = load_overlay
        self._lock = threading.Lock()
        self._tenants: dict[str, Tenant] = {}
        for entry in tenants_file.tenants.values():
            tenant = Tenant(entry.name, _digest(entry.key_hash, f"[tenants.{entry.name}]"))
            patch = tenants_file.patch_path(entry)
            if patch is not None:
                try:
                    tenant.overlay, tenant.patch = load_overlay(patch), patch
                except (ValueError, OSError) as err:
                    raise ValueError(f"tenant {entry.name!r}: patch {patch} refused: {err}") from err
            self._tenants[entry.name] = tenant

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], load_overlay: Callable[[Path], RowOverlay]) -> "TenantRegistry":
        """Read the tenants file and load every tenant's patch (``ValueError`` naming the tenant if one is refused)."""
        return cls(read_tenants(path), load_overlay)

    def identify(self, key: str) -> Tenant | None:
        """The tenant whose key ``key`` is, else None. Every stored digest is compared, whatever matched, so the
        time taken does not depend on the key."""
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for tenant in list(self._tenants.values()):
            if hmac.compare_digest(digest, tenant.digest):
                found = tenant
        return found

    def is_admin(self, key: str) -> bool:
        """Whether ``key`` is the admin key (constant-time comparison)."""
        return hmac.compare_digest(hashlib.sha256(key.encode()).digest(), self._admin_digest)

    def get(self, name: str) -> Tenant:
        """The tenant ``name``; ``KeyError`` naming it when there is none."""
        try:
            return self._tenants[name]
        except KeyError:
            raise KeyError(f"no tenant named {name!r}") from None

    def tenants(self) -> list[Tenant]:
        return list(self._tenants.values())

    def set_patch(self, name: str, patch: str | os.PathLike[str]) -> Tenant:
        """Load ``patch`` as ``name``'s overlay (the running server only; the file is not changed).

        ``ValueError`` with the loader's message when the patch is refused; the old overlay then stays.
        Requests already running keep the overlay they started with.
        """
        tenant = self.get(name)
        path = Path(patch)
        overlay = self._load_overlay(path)
        with self._lock:
            tenant.overlay, tenant.patch = overlay, path
        return tenant

    def clear_patch(self, name: str) -> Tenant:
        """Make ``name`` read the base memory again (the running server only)."""
        tenant = self.get(name)
        with self._lock:
            tenant.overlay, tenant.patch = None, None
        return tenant
