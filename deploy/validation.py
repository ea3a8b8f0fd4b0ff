"""Checking the deploy options (deploy/config.py) before anything runs:
every bad value is refused with the option's name, what it expects and
what it found."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from metaflow_services import encryption
from metaflow_services.archive import BackupError
from metaflow_services.errors import ExitCode, ServicesError

ROLES = ("viewer", "user", "op", "admin")
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_USER_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
_PROJECT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,40}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
_URL_RE = re.compile(r"^https?://[A-Za-z0-9._:/@%-]+$")


class ConfigError(ServicesError):
    """An option is unknown or has a bad value; the message says which and how
    to fix it."""

    exit_code = ExitCode.USAGE


def validate(o, source="options"):
    """*o* if every option holds; else ConfigError naming the first bad one."""
    def fail(key, msg):
        raise ConfigError("%s: %s: %s" % (source, key, msg))

    for check in (_check_general, _check_ports, _check_tls, _check_airflow, _check_upkeep,
                  _check_sources):
        check(o, fail)
    return o


# (option, pattern, what it expects): checked by _check_general.
_PATTERNS = [
    ("project", _PROJECT_RE, "lower-case letters, digits, '-' or '_'"),
    ("bucket", _BUCKET_RE, "an S3 bucket name (3-63 of a-z 0-9 . -)"),
    ("metaflow_ui.user", _NAME_RE, "a-z, 0-9 and _, starting with a letter"),
]
_CHOICES = [
    ("object_store", ("seaweedfs", "minio")),
    ("executor", ("docker", "subprocess")),
    ("smoke_test", ("always", "on-change", "never")),
    ("install.docker_source", ("auto", "distribution", "docker")),
]


def _get(o, key_path):
    for part in key_path.split("."):
        o = getattr(o, part)
    return o


def _check_general(o, fail):
    for key, allowed in _CHOICES:
        if _get(o, key) not in allowed:
            fail(key, "expected one of %s, found %r" % (", ".join(allowed), _get(o, key)))
    for key, pattern, expected in _PATTERNS:
        if not pattern.match(_get(o, key)):
            fail(key, "expected %s, found %r" % (expected, _get(o, key)))
    if not o.public_host:
        fail("public_host", "not set and no -H host to default to")
    if not (_HOST_RE.match(o.public_host) or is_ip(o.public_host)):
        fail("public_host", "expected a host name or an IP address, found %r" % o.public_host)
    for key in ("install_dir", "data_dir"):
        value = getattr(o, key)
        if not _PATH_RE.match(value) or value.rstrip("/") in ("", "/usr", "/etc", "/var", "/opt",
                                                              "/srv", "/home", "/root", "/tmp"):
            fail(key, "expected an absolute path of its own (letters, digits, . _ - /), found %r"
                 % value)
    if o.install_dir.rstrip("/") == o.data_dir.rstrip("/"):
        fail("data_dir", "must differ from install_dir")
    if not (o.health_timeout >= 60):
        fail("health_timeout", "expected at least 60 seconds, found %r" % o.health_timeout)
    if not _USER_RE.match(o.flows.default_user) or o.flows.default_user == "root":
        fail("flows.default_user", "expected a user name other than root (a-z, 0-9, '.', '_', "
             "'-', starting with a letter; Metaflow refuses to record runs as root), found %r"
             % o.flows.default_user)
    if o.preflight.min_memory_gb < 0 or o.preflight.min_disk_gb < 0:
        fail("preflight", "minimums cannot be negative")


def _check_ports(o, fail):
    p = o.ports
    if not is_ip(p.bind_address):
        fail("ports.bind_address", "expected an IP address, found %r" % p.bind_address)
    for key in ("https", "metaflow", "s3"):
        value = getattr(p, key)
        if not 1 <= value <= 65535:
            fail("ports.%s" % key, "expected a port number (1-65535), found %r" % value)
    if len({p.https, p.metaflow, p.s3}) != 3:
        fail("ports", "https, metaflow and s3 must be three different ports, found %d, %d, %d"
             % (p.https, p.metaflow, p.s3))


def _check_tls(o, fail):
    if bool(o.tls.cert) != bool(o.tls.key):
        fail("tls", "give both cert and key, or neither (for a self-signed certificate)")
    for key in ("cert", "key"):
        value = getattr(o.tls, key)
        if value and not Path(value).expanduser().is_file():
            fail("tls.%s" % key, "no such file on this workstation: %s" % value)


def _check_airflow(o, fail):
    a = o.airflow
    if not a.users:
        fail("airflow.users", "at least one user (with role admin) is needed")
    for name, role in a.users.items():
        if not _NAME_RE.match(name):
            fail("airflow.users", "user name %r: expected a-z, 0-9 and _, starting with a letter"
                 % name)
        if role not in ROLES:
            fail("airflow.users.%s" % name, "expected a role (%s), found %r"
                 % (", ".join(ROLES), role))
    if "admin" not in a.users.values():
        fail("airflow.users", "at least one user needs the admin role")
    for key in ("parallelism", "parsing_processes"):
        value = getattr(a, key)
        if value != "auto" and not (isinstance(value, int) and 1 <= value <= 256):
            fail("airflow.%s" % key, "expected 'auto' or 1-256, found %r" % value)


def _check_upkeep(o, fail):
    for key in ("task_logs_days", "airflow_metadata_days"):
        if getattr(o.retention, key) < 0:
            fail("retention.%s" % key, "expected 0 (never) or more days, found %r"
                 % getattr(o.retention, key))
    if not 5 <= o.retention.docker_logs_mb <= 10000:
        fail("retention.docker_logs_mb", "expected 5-10000, found %r" % o.retention.docker_logs_mb)
    b = o.backup
    if b.schedule and not _SCHEDULE_RE.match(b.schedule):
        fail("backup.schedule", "expected HH:MM (UTC, e.g. 02:30) or empty, found %r"
             % b.schedule)
    if b.keep < 1:
        fail("backup.keep", "expected at least 1, found %r" % b.keep)
    if not b.dir.startswith("/") or b.dir.rstrip("/") in ("", o.install_dir, o.data_dir):
        fail("backup.dir", "expected an absolute path of its own, found %r" % b.dir)
    if b.encrypt_to:
        try:
            encryption.recipients(b.encrypt_to)
        except BackupError as e:
            fail("backup.encrypt_to", str(e))


def _check_sources(o, fail):
    """Where images and packages come from."""
    for f in dataclasses.fields(o.images):
        value = getattr(o.images, f.name)
        if value and not _IMAGE_RE.match(value):
            fail("images.%s" % f.name, "expected an image reference, found %r" % value)
    for key in ("apt_mirror", "apt_proxy", "docker_apt_repo"):
        value = getattr(o.install, key)
        if value and not _URL_RE.match(value):
            fail("install.%s" % key, "expected an http(s) URL, found %r" % value)
    _check_packages(o.packages, fail)


def _check_packages(p, fail):
    for key in ("index_url", "extra_index_url"):
        value = getattr(p, key)
        if value and not _URL_RE.match(value):
            fail("packages.%s" % key, "expected the http(s) URL of a package index (like "
                 "https://pypi.example.com/simple), found %r" % value)
    for host in filter(None, re.split(r"[\s,]+", p.trusted_hosts)):
        if not re.match(r"^[A-Za-z0-9.-]+(:[0-9]+)?$", host):
            fail("packages.trusted_hosts", "expected host names (host or host:port, "
                 "comma-separated), found %r" % host)
    if p.ca_bundle:
        path = Path(p.ca_bundle).expanduser()
        if not path.is_file():
            fail("packages.ca_bundle", "no such file on this workstation: %s" % p.ca_bundle)
        try:
            data = path.read_bytes()
        except OSError as e:
            fail("packages.ca_bundle", "cannot read %s: %s" % (p.ca_bundle, e))
        if b"-----BEGIN CERTIFICATE-----" not in data:
            fail("packages.ca_bundle", "%s holds no PEM certificate (-----BEGIN CERTIFICATE-----); "
                 "give the CA's certificate in PEM form (from DER: openssl x509 -inform der "
                 "-in %s -out ca.pem)" % (p.ca_bundle, p.ca_bundle))


_SCHEDULE_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def is_ip(value):
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


