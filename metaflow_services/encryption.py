"""Encrypted copies of backups, with age (https://age-encryption.org, through
pyrage: the Rust implementation's Python bindings).

A backup is written in plain text into the VM's backup folder (mode 0700,
root's: the VM holds every secret anyway); with recipients (`fab backup
--encrypt-to`, the option backup.encrypt_to) an encrypted copy NAME.age is
written next to it, and that copy is what leaves the VM. Recipients are age
public keys (age1...) or SSH public keys (ssh-ed25519, ssh-rsa); the matching
identity (an age identity file, or the SSH private key) opens the copy on
the workstation that restores it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .archive import BackupError

SUFFIX = ".age"
MAGIC = b"age-encryption.org/v1\n"
_SSH = re.compile(r"^(ssh-ed25519|ssh-rsa)\s+([A-Za-z0-9+/=]+)")


def _pyrage():
    try:
        import pyrage
    except ImportError:  # an install without the [airflow]/[deploy] extra
        raise BackupError("encrypted backups need pyrage (pip install 'pyrage>=1.2,<2')")
    return pyrage


def normalize(text: str) -> str:
    """Recipients (comma- or newline-separated) in one canonical line: SSH
    keys lose their comment (it could hold anything, e.g. '#')."""
    out = []
    for item in filter(None, (x.strip() for x in re.split(r"[,\n]", text or ""))):
        m = _SSH.match(item)
        out.append("%s %s" % m.groups() if m else item)
    return ",".join(out)


def recipients(text: str) -> list:
    """The pyrage recipients of *text*; BackupError naming a bad one."""
    pyrage = _pyrage()
    found = []
    for item in filter(None, normalize(text).split(",")):
        try:
            if item.startswith("age1"):
                found.append(pyrage.x25519.Recipient.from_str(item))
            elif _SSH.match(item):
                found.append(pyrage.ssh.Recipient.from_str(item))
            else:
                raise ValueError("expected an age public key (age1...) or an SSH public key "
                                 "(ssh-ed25519 or ssh-rsa)")
        except (ValueError, pyrage.RecipientError) as e:
            raise BackupError("encryption recipient %r is not usable: %s" % (item[:40], e))
    if not found:
        raise BackupError("no encryption recipient given")
    return found


def is_encrypted(path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def encrypt_copy(path: Path, recipient_text: str) -> Path:
    """PATH.age (mode 0600), encrypted to the recipients; written whole or
    not at all."""
    to = recipients(recipient_text)
    final = Path(str(path) + SUFFIX)
    partial = Path(str(final) + ".partial")
    os.close(os.open(str(partial), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        _pyrage().encrypt_file(str(path), str(partial), to)
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return final


def identities(identity_file: Path) -> list:
    """The identities in an age identity file, or an (unencrypted) SSH
    private key."""
    pyrage = _pyrage()
    try:
        data = Path(identity_file).read_bytes()
    except OSError as e:
        raise BackupError("cannot read the identity file %s: %s" % (identity_file, e))
    try:
        if b"PRIVATE KEY-----" in data:
            return [pyrage.ssh.Identity.from_buffer(data)]
        keys = [line.strip() for line in data.decode().splitlines()
                if line.strip().startswith("AGE-SECRET-KEY-")]
        if keys:
            return [pyrage.x25519.Identity.from_str(k) for k in keys]
    except (ValueError, UnicodeDecodeError, pyrage.IdentityError) as e:
        hint = (" (a passphrase-protected SSH key: make a copy without it, ssh-keygen -p)"
                if "decrypted first" in str(e) else "")
        raise BackupError("%s is not a usable identity: %s%s" % (identity_file, e, hint))
    raise BackupError("%s holds no age identity (AGE-SECRET-KEY-1...) and no SSH private key"
                      % identity_file)


def decrypt(path: Path, identity_file: Path, out: Path) -> Path:
    """*out* (mode 0600): the archive inside the encrypted copy *path*."""
    keys = identities(identity_file)
    os.close(os.open(str(out), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    try:
        _pyrage().decrypt_file(str(path), str(out), keys)
    except Exception as e:  # pyrage.DecryptError and I/O errors
        out.unlink(missing_ok=True)
        if "No matching keys" in str(e):
            raise BackupError("%s does not open %s: it was encrypted to another key"
                              % (identity_file, path.name))
        raise BackupError("cannot decrypt %s: %s" % (path.name, e))
    return out
