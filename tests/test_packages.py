"""Where step environment images get packages, on this machine's real Docker
engine with the test step image: a private HTTPS index that only a CA of the
test's own makes trusted (the deploy's packages.ca_bundle), the messages when
the index is untrusted or unreachable, and a bundle's wheelhouse (made by
`fab bundle --flows`'s own code) that builds with no network at all, naming
what it lacks.

The VM-level versions (a deployed stack behind the private index, an
air-gapped worker VM) are in tests/deploy/test_deploy_packages.py and
test_deploy_workers.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import tarfile

import pytest

import pyindex
from support import FLOWS, deploy_module, docker_available

pytestmark = pytest.mark.e2e

STEP_IMAGE = "mfs-step:test"
TOOLZ = {"packages": ["toolz==0.12.1"], "python": None, "source": "@pypi"}
LOG = logging.getLogger("test_packages")


@pytest.fixture(scope="module")
def client():
    if not docker_available():
        pytest.fail("environment images need a Docker engine (scripts/host-setup starts one)")
    import docker

    return docker.from_env()


@pytest.fixture(scope="module")
def gateway(client):
    """The address build containers reach this machine at: the bridge's
    gateway (Docker 20.10 sometimes leaves it out of the IPAM config: then
    docker0's own address, which is the gateway)."""
    config = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return config["Gateway"]
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "docker0"], stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    return out.split(" inet ", 1)[1].split("/", 1)[0]


@pytest.fixture(scope="module")
def index(tmp_path_factory, gateway):
    d = tmp_path_factory.mktemp("pyindex")
    certs = pyindex.make_ca(d / "tls", [gateway, "127.0.0.1"])
    pyindex.download(["toolz==0.12.1"], d / "wheels")
    idx = pyindex.Index(d / "wheels", "0.0.0.0", _free_port(), certs, d / "requests.log",
                        public=gateway)
    yield idx
    idx.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(tmp_path, **kw):
    from metaflow_services.config import Settings

    return Settings(executor="docker", lock_dir=str(tmp_path / "locks"),
                    state_dir=str(tmp_path / "state"), **kw)


def build(client, environment, s):
    from metaflow_services.images import ensure_environment_image, environment_tag

    tag = environment_tag(STEP_IMAGE, environment)
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
    return ensure_environment_image(client, STEP_IMAGE, environment, s, LOG)


def in_image(tag, code):
    return subprocess.run(["docker", "run", "--rm", "--entrypoint", "", tag, "python3", "-c",
                           code], check=True, capture_output=True, text=True).stdout.strip()


def no_image(client, environment):
    import docker.errors

    from metaflow_services.images import environment_tag

    try:
        client.images.get(environment_tag(STEP_IMAGE, environment))
        return False
    except docker.errors.ImageNotFound:
        return True


def test_a_private_index_behind_its_own_ca_builds_with_the_ca_bundle(client, index, tmp_path):
    tag = build(client, TOOLZ, settings(tmp_path, pip_index_url=index.url,
                                        pip_cert=str(index.certs["ca"])))
    assert in_image(tag, "import toolz; print(toolz.__version__)") == "0.12.1"
    fetched = [path for _, path in index.requests()]
    assert "/files/toolz-0.12.1-py3-none-any.whl" in fetched, fetched


def test_an_untrusted_index_says_to_set_packages_ca_bundle(client, index, tmp_path):
    from metaflow_services.images import EnvironmentBuildError

    with pytest.raises(EnvironmentBuildError) as e:
        build(client, TOOLZ, settings(tmp_path, pip_index_url=index.url))
    msg = str(e.value)
    assert "pip does not trust the certificate of %s" % index.url in msg, msg
    assert "set packages.ca_bundle in deploy.yaml" in msg and "MFS_PIP_CERT" in msg, msg
    assert "no image was kept" in msg and no_image(client, TOOLZ)


def test_an_unreachable_index_says_which_option_to_set(client, gateway, tmp_path):
    from metaflow_services.images import EnvironmentBuildError

    url = "https://%s:%d/simple" % (gateway, _free_port())   # nothing listens there
    with pytest.raises(EnvironmentBuildError) as e:
        build(client, TOOLZ, settings(tmp_path, pip_index_url=url))
    msg = str(e.value)
    assert "this VM cannot reach %s" % url in msg, msg
    assert "set packages.index_url" in msg and "fab bundle --flows DIR" in msg, msg


# -- the bundle's wheelhouse ---------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """What `fab bundle --flows tests/flows/wheelhouse` puts into the bundle,
    unpacked as the deploy unpacks it on a VM."""
    Options, Out = deploy_module("config").Options, deploy_module("remote").Out
    wheels = deploy_module("wheels")

    work = tmp_path_factory.mktemp("bundle")
    o = Options()
    # This machine reaches PyPI through a TLS-inspecting proxy.
    o.packages.ca_bundle = os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    text = io.StringIO()
    entry = wheels.make_wheelhouse(o, STEP_IMAGE, FLOWS / "wheelhouse", work, Out(stream=text))
    house = work / "unpacked"
    with tarfile.open(work / wheels.MEMBER) as tar:
        tar.extractall(house)
    return {"entry": entry, "dir": house, "output": text.getvalue()}


def test_the_bundle_resolves_each_environment_for_the_step_images_python(wheelhouse):
    entry, house = wheelhouse["entry"], wheelhouse["dir"]
    assert entry["flows"] == ["wheelhouse_flow.py"] and entry["environments"] == 1, entry
    index = json.loads((house / "index.json").read_text())
    (env,) = index["environments"].values()
    assert env["packages"] == ["jinja2==3.1.4"] and env["flows"] == ["wheelhouse_flow.py"]
    assert any(f.startswith("Jinja2-3.1.4") or f.startswith("jinja2-3.1.4") for f in env["files"])
    # MarkupSafe, jinja2's dependency, compiled for the step image's CPython
    # (3.11 here), whatever Python made the bundle.
    py = "cp%s%s" % tuple(index["python"].split(".")[:2])
    assert any(f.lower().startswith("markupsafe-") and "-%s-" % py in f for f in env["files"]), env
    assert "jinja2==3.1.4: %d wheels" % len(env["files"]) in wheelhouse["output"]


def test_the_wheelhouse_builds_with_no_network(client, wheelhouse, tmp_path):
    env = {"packages": ["jinja2==3.1.4"], "python": None, "source": "@pypi"}
    s = settings(tmp_path, pip_wheelhouse=str(wheelhouse["dir"]))
    from metaflow_services.images import source_name

    assert source_name(s, ["x.whl"]) == "the wheelhouse %s only" % wheelhouse["dir"]
    tag = build(client, env, s)     # offline: the build has network "none"
    out = in_image(tag, "import jinja2, markupsafe; print(jinja2.__version__, "
                        "markupsafe.Markup.escape('<b>'))")
    assert out == "3.1.4 &lt;b&gt;", out
    # The wheels were installed, not kept in the image.
    assert in_image(tag, "import os; print(os.path.exists('/tmp/mfs-wheelhouse'))") == "False"


def test_a_pin_missing_from_the_wheelhouse_is_named_with_the_command_that_adds_it(
        client, wheelhouse, tmp_path):
    from metaflow_services.images import EnvironmentBuildError

    env = {"packages": ["jinja2==3.1.4", "toolz==0.12.1"], "python": None, "source": "@pypi"}
    with pytest.raises(EnvironmentBuildError) as e:
        build(client, env, settings(tmp_path, pip_wheelhouse=str(wheelhouse["dir"])))
    msg = str(e.value)
    assert "lacks toolz==0.12.1, and no package index is configured" in msg, msg
    assert "jinja2" not in msg.split("lacks")[1].split(",")[0]
    assert "fab bundle --flows DIR" in msg and "fab deploy --bundle FILE" in msg, msg
    assert no_image(client, env)


def test_a_flow_that_cannot_load_stops_the_bundle_naming_it(tmp_path):
    Options, Out = deploy_module("config").Options, deploy_module("remote").Out
    DeployError, make_wheelhouse = deploy_module("remote").DeployError, \
        deploy_module("wheels").make_wheelhouse
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "broken_flow.py").write_text(
        "from metaflow import FlowSpec, step\nimport not_installed_anywhere\n\n"
        "class BrokenFlow(FlowSpec):\n    @step\n    def start(self):\n        self.next(self.end)\n"
        "\n    @step\n    def end(self):\n        pass\n\nif __name__ == '__main__':\n"
        "    BrokenFlow()\n")
    (tmp_path / "work").mkdir()
    with pytest.raises(DeployError) as e:
        make_wheelhouse(Options(), STEP_IMAGE, tmp_path / "flows", tmp_path / "work",
                        Out(stream=io.StringIO()))
    assert "cannot read the environments of %s" % (tmp_path / "flows" / "broken_flow.py") \
        in str(e.value)
    assert "not_installed_anywhere" in str(e.value)
    assert not (tmp_path / "work" / "wheelhouse.tar").exists()
