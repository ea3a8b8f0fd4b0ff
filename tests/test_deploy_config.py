"""The deploy options (deploy/config.py): the documented example is the
defaults, and every mistake is refused before connecting, naming the key and
the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support import REPO, deploy_module

config = deploy_module("config")


def load_text(tmp_path, text, **kw):
    p = tmp_path / "deploy.yaml"
    p.write_text(text)
    return config.load(p, host="vm.example.com", **kw)


def test_the_example_file_documents_the_defaults():
    example = config.load(REPO / "deploy.example.yaml", host="vm.example.com")
    assert example == config.validate(config.Options(public_host="vm.example.com"))
    text = (REPO / "deploy.example.yaml").read_text()
    for key in config.describe(example):
        assert key.split(".")[-1] + ":" in text, key


def test_file_then_flags(tmp_path):
    o = load_text(tmp_path, "object_store: minio\nports:\n  https: 8443\n  metaflow: 9443\n",
                  flags={"ports.s3": "9100", "metaflow_services": "off"})
    assert (o.object_store, o.ports.https, o.ports.s3, o.metaflow_services) == \
        ("minio", 8443, 9100, False)
    assert o.public_host == "vm.example.com" and o.airflow_url == "https://vm.example.com:8443"
    o = load_text(tmp_path, "", flags={"airflow.users": "admin:admin,ana:op"})
    assert o.airflow.users == {"admin": "admin", "ana": "op"}


@pytest.mark.parametrize("text, message", [
    ("objectstore: minio\n",
     "unknown option 'objectstore' (did you mean 'object_store'?); known options: "),
    ("ports:\n  htps: 8443\n",
     "unknown option 'ports.htps' (did you mean 'https'?); known options of ports: "
     "bind_address, https, metaflow, s3"),
    ("ports: 443\n", "ports: expected a mapping of options (bind_address, https, metaflow, s3)"),
    ("object_store: ceph\n", "object_store: expected one of seaweedfs, minio, found 'ceph'"),
    ("ports:\n  s3: 443\n", "ports: https, metaflow and s3 must be three different ports"),
    ("ports:\n  https: http\n", "ports.https: expected a whole number, found 'http'"),
    ("metaflow_services: maybe\n", "metaflow_services: expected true or false, found 'maybe'"),
    ("tls:\n  cert: /nonexistent.pem\n", "tls: give both cert and key, or neither"),
    ("tls:\n  cert: /nonexistent.pem\n  key: /nonexistent.key\n",
     "tls.cert: no such file on this workstation: /nonexistent.pem"),
    ("airflow:\n  users:\n    ana: op\n", "airflow.users: at least one user needs the admin role"),
    ("airflow:\n  users:\n    admin: root\n",
     "airflow.users.admin: expected a role (viewer, user, op, admin), found 'root'"),
    ("bucket: My_Bucket\n", "bucket: expected an S3 bucket name"),
    ("install_dir: /opt\n", "install_dir: expected an absolute path of its own"),
    ("data_dir: relative/dir\n", "data_dir: expected an absolute path of its own"),
    ("install:\n  apt_proxy: ftp://x\n", "install.apt_proxy: expected an http(s) URL"),
    ("packages:\n  index_url: pypi.example.com/simple\n",
     "packages.index_url: expected the http(s) URL of a package index"),
    ("packages:\n  trusted_hosts: https://pypi.example.com\n",
     "packages.trusted_hosts: expected host names (host or host:port, comma-separated), "
     "found 'https://pypi.example.com'"),
    ("backup:\n  encrypt_to: age1notakey\n",
     "backup.encrypt_to: encryption recipient 'age1notakey' is not usable"),
    ("packages:\n  ca_bundle: /nonexistent-ca.pem\n",
     "packages.ca_bundle: no such file on this workstation: /nonexistent-ca.pem"),
    ("- a\n- b\n", "expected a mapping of options at the top level"),
    ("a: [\n", "not valid YAML"),
])
def test_mistakes_in_the_file_are_refused(tmp_path, text, message):
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, text)
    assert message in str(e.value)
    assert str(e.value).startswith(str(tmp_path / "deploy.yaml"))


def test_a_ca_bundle_must_hold_a_pem_certificate(tmp_path):
    der = tmp_path / "ca.der"
    der.write_bytes(b"0\x82\x01\x0a not pem")
    with pytest.raises(config.ConfigError) as e:
        load_text(tmp_path, "", flags={"packages.ca_bundle": str(der)})
    assert "packages.ca_bundle: %s holds no PEM certificate" % der in str(e.value)
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    o = load_text(tmp_path, "packages:\n  index_url: https://pypi.example.com/simple\n"
                            "  trusted_hosts: a.example.com, b.example.com:8080\n",
                  flags={"packages.ca_bundle": str(pem)})
    assert (o.packages.index_url, o.packages.ca_bundle) == ("https://pypi.example.com/simple",
                                                            str(pem))


def test_mistakes_in_flags_are_refused(tmp_path):
    with pytest.raises(config.ConfigError, match=r"--set airflow.paralelism: unknown option "
                                                 r"'airflow.paralelism' \(did you mean "
                                                 r"'parallelism'\?\)"):
        load_text(tmp_path, "", flags={"airflow.paralelism": "4"})
    with pytest.raises(config.ConfigError, match="airflow is a section"):
        load_text(tmp_path, "", flags={"airflow": "x"})
    with pytest.raises(config.ConfigError, match="expected 'auto' or a whole number"):
        load_text(tmp_path, "", flags={"airflow.parallelism": "many"})


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError, match="no such options file"):
        config.load(tmp_path / "nope.yaml", host="h")


def test_the_record_of_a_deploy_gives_back_its_options(tmp_path):
    """`fab status/start/stop/destroy` use the options the VM was deployed with."""
    import json

    o = load_text(tmp_path, "object_store: minio\nmetaflow_services: false\nairflow:\n"
                            "  users: {admin: admin, ana: op}\n  parallelism: 6\n")
    recorded = json.loads(json.dumps(config.describe(o)))
    assert config.from_description(recorded) == o
    recorded["an_option_of_a_newer_version"] = 1
    assert config.from_description(recorded) == o
