"""Deploy options: one object per section of the options file, validated up
front (before anything connects to the VM).

Options come from a YAML file (``deploy.yaml`` next to the fabfile, or
``--config FILE``; ``deploy.example.yaml`` documents every key) and from task
flags, which win. Unknown keys and bad values are errors that name the key
path and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from .validation import ConfigError, validate  # noqa: F401 (the options API)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "deploy.yaml"

def _doc(text, **kw):
    return field(metadata={"doc": text}, **kw)


@dataclass
class Ports:
    bind_address: str = _doc("address the proxy's ports listen on", default="0.0.0.0")
    https: int = _doc("Airflow UI and REST API", default=443)
    metaflow: int = _doc("Metaflow UI, its API and the metadata API", default=8443)
    s3: int = _doc("S3 endpoint of the object store", default=9000)


@dataclass
class TLS:
    cert: str = _doc("certificate (PEM, with chain) on this workstation; empty: self-signed",
                     default="")
    key: str = _doc("its private key (PEM) on this workstation", default="")


@dataclass
class Airflow:
    users: dict = _doc("user name -> role (viewer, user, op, admin); passwords are generated",
                       default_factory=lambda: {"admin": "admin"})
    parallelism: object = _doc("task slots of the LocalExecutor; auto: from the VM's cores "
                               "and memory", default="auto")
    parsing_processes: object = _doc("DAG parsing processes; auto: 1 below 4 cores",
                                     default="auto")
    dags_paused_at_creation: bool = _doc("new DAGs start paused", default=True)


@dataclass
class Retention:
    task_logs_days: int = _doc("Airflow task logs older than this are deleted; 0: never",
                               default=30)
    airflow_metadata_days: int = _doc("finished DAG runs, task instances, XComs and jobs older "
                                      "than this leave Airflow's database (airflow db clean); "
                                      "0: never", default=90)
    docker_logs_mb: int = _doc("log space per container (Docker's json-file, 5 files)",
                               default=50)


@dataclass
class Backup:
    dir: str = _doc("where backups are written on the VM (mode 0700: they hold the secrets)",
                    default="/var/backups/metaflow-services")
    schedule: str = _doc("HH:MM (UTC) for a nightly backup; empty: only `fab backup`",
                         default="")
    keep: int = _doc("backups kept in backup.dir; older ones are deleted after each backup",
                     default=7)
    max_age_days: float = _doc("`fab status` warns when the newest backup is older",
                               default=2.0)
    encrypt_to: str = _doc("age (age1...) or SSH public keys, comma-separated: every backup "
                           "also gets an encrypted copy NAME.age, the one fab backup --to "
                           "copies off the VM", default="")


@dataclass
class MetaflowUI:
    user: str = _doc("basic-auth user of the Metaflow UI (password generated)",
                     default="metaflow")


@dataclass
class Flows:
    default_user: str = _doc("Metaflow user of runs of flows saved by root (fab -H root@vm "
                             "push-flows, scp as root) or by an account the VM does not name; "
                             "others run as the file's owner", default="metaflow-services")


@dataclass
class Images:
    postgres: str = _doc("", default="")
    seaweedfs: str = _doc("", default="")
    minio: str = _doc("", default="")
    proxy: str = _doc("", default="")
    airflow: str = _doc("the stack's Airflow image; empty: built from compose/airflow",
                        default="")
    step: str = _doc("default image of Metaflow steps; empty: built from compose/step",
                     default="")
    metadata: str = _doc("", default="")
    metaflow_ui: str = _doc("", default="")
    airflow_base: str = _doc("base of the built Airflow image", default="")
    step_base: str = _doc("base of the built step image", default="")


@dataclass
class Install:
    docker_source: str = _doc("auto | distribution | docker (Docker's apt repository)",
                              default="auto")
    apt_mirror: str = _doc("Debian/Ubuntu mirror for the packages the deploy installs",
                           default="")
    apt_proxy: str = _doc("HTTP proxy for apt (e.g. apt-cacher-ng)", default="")
    docker_apt_repo: str = _doc("Docker's apt repository (or a mirror of it)",
                                default="https://download.docker.com/linux")


@dataclass
class Packages:
    index_url: str = _doc("package index of step environment images (@pypi, @conda, "
                          "requirements.txt) and of image builds; empty: PyPI", default="")
    extra_index_url: str = _doc("a second index pip also searches", default="")
    trusted_hosts: str = _doc("hosts pip reaches without checking TLS (comma-separated); "
                              "prefer ca_bundle", default="")
    ca_bundle: str = _doc("PEM file on this workstation: the CA of your index or of a "
                          "TLS-inspecting proxy; every image build on the VMs trusts it",
                          default="")


@dataclass
class Preflight:
    min_memory_gb: float = _doc("refuse VMs with less memory", default=3.5)
    min_disk_gb: float = _doc("refuse VMs with less free disk for Docker", default=20.0)


@dataclass
class Options:
    public_host: str = _doc("name or IP browsers and laptops use; default: the -H host",
                            default="")
    project: str = _doc("Compose project name (prefix of containers, volumes, network)",
                        default="metaflow-services")
    install_dir: str = _doc("stack files, settings and secrets on the VM",
                            default="/opt/metaflow-services")
    data_dir: str = _doc("holds dags/, the dags folder users drop flows into, on the VM",
                         default="/srv/metaflow-services")
    object_store: str = _doc("seaweedfs | minio", default="seaweedfs")
    metaflow_services: bool = _doc("run the Metaflow metadata service and UI", default=True)
    bucket: str = _doc("S3 bucket for Metaflow's data", default="metaflow")
    executor: str = _doc("docker | subprocess: where Metaflow steps run", default="docker")
    smoke_test: str = _doc("always | on-change | never: run a hello flow after deploying",
                           default="on-change")
    health_timeout: int = _doc("seconds to wait for every service to be healthy",
                               default=900)
    ports: Ports = field(default_factory=Ports)
    tls: TLS = field(default_factory=TLS)
    airflow: Airflow = field(default_factory=Airflow)
    metaflow_ui: MetaflowUI = field(default_factory=MetaflowUI)
    flows: Flows = field(default_factory=Flows)
    retention: Retention = field(default_factory=Retention)
    backup: Backup = field(default_factory=Backup)
    images: Images = field(default_factory=Images)
    install: Install = field(default_factory=Install)
    packages: Packages = field(default_factory=Packages)
    preflight: Preflight = field(default_factory=Preflight)

    # -- derived ------------------------------------------------------------

    def public_url(self, port):
        host = self.public_host
        if ":" in host:  # IPv6 literal
            host = "[%s]" % host
        return "https://%s" % host if port == 443 else "https://%s:%d" % (host, port)

    @property
    def airflow_url(self):
        return self.public_url(self.ports.https)

    @property
    def metaflow_url(self):
        return self.public_url(self.ports.metaflow)

    @property
    def s3_url(self):
        return self.public_url(self.ports.s3)

    @property
    def admin_user(self):
        return next(u for u, r in self.airflow.users.items() if r == "admin")

    def published_ports(self):
        ports = [self.ports.https, self.ports.s3]
        if self.metaflow_services:
            ports.append(self.ports.metaflow)
        return ports


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load(path=None, flags=None, host=None) -> Options:
    """Options from the file (if any), then flags ({"a.b": "value"} strings),
    validated. *host* (the -H host) is the default public_host."""
    opts = Options()
    source = None
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    if path is not None:
        path = Path(path).expanduser()
        source = str(path)
        if not path.exists():
            raise ConfigError("%s: no such options file (copy deploy.example.yaml)" % path)
        data = _read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("%s: expected a mapping of options at the top level" % path)
        _apply_mapping(opts, data, "", source)
    for key, value in (flags or {}).items():
        set_option(opts, key, value, source="flag --%s" % key.replace("_", "-")
                   if "." not in key else "--set %s" % key)
    if not opts.public_host and host:
        opts.public_host = host
    validate(opts, source or "options")
    return opts


def _read_yaml(path):
    try:
        import yaml
    except ImportError:  # Fabric's invoke bundles a copy of PyYAML.
        from invoke.vendor import yaml
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("%s: not valid YAML: %s" % (path, str(e).replace("\n", " ")))


def _fields(obj):
    return {f.name: f for f in dataclasses.fields(obj)}


def _unknown(key_path, name, known, source):
    close = difflib.get_close_matches(name, known, n=1)
    hint = " (did you mean %r?)" % close[0] if close else ""
    return ConfigError("%s: unknown option %r%s; known options%s: %s"
                       % (source, key_path, hint,
                          " of %s" % key_path.rsplit(".", 1)[0] if "." in key_path else "",
                          ", ".join(sorted(known))))


def _apply_mapping(obj, data, prefix, source):
    fields = _fields(obj)
    for name, value in data.items():
        key_path = prefix + str(name)
        if name not in fields:
            raise _unknown(key_path, str(name), fields, source)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError("%s: %s: expected a mapping of options (%s)"
                                  % (source, key_path, ", ".join(sorted(_fields(current)))))
            _apply_mapping(current, value, key_path + ".", source)
        else:
            setattr(obj, name, _coerce(key_path, fields[name], value, source))


def set_option(opts, key_path, value, source="flag"):
    """Set one option from a string (task flags, --set a.b=c)."""
    obj = opts
    parts = key_path.replace("-", "_").split(".")
    for i, part in enumerate(parts):
        fields = _fields(obj)
        if part not in fields:
            raise _unknown(".".join(parts[:i + 1]), part, fields, source)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError("%s: %s is a section; set one of its options: %s"
                                  % (source, key_path, ", ".join(sorted(_fields(getattr(obj, part))))))
            setattr(obj, part, _coerce(key_path, fields[part], value, source, from_string=True))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError("%s: %s is not a section" % (source, ".".join(parts[:i + 1])))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(key_path, f, value, source, from_string=False):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    bad = lambda what: ConfigError("%s: %s: expected %s, found %r" % (source, key_path, what, value))  # noqa: E731
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise bad("true or false")
    if isinstance(default, dict):
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        if from_string and isinstance(value, str):
            out = {}
            for item in filter(None, (i.strip() for i in value.split(","))):
                if ":" not in item:
                    raise bad("NAME:ROLE[,NAME:ROLE...]")
                k, v = item.split(":", 1)
                out[k.strip()] = v.strip()
            return out
        raise bad("a mapping")
    if key_path.endswith(("parallelism", "parsing_processes")):
        if value == "auto":
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad("'auto' or a whole number")
    for kind, what in ((int, "a whole number"), (float, "a number")):
        if isinstance(default, kind):
            if isinstance(value, bool):
                raise bad(what)
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise bad(what)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise bad("a single value")
    return str(value)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def from_description(flat: dict) -> Options:
    """The Options that describe() wrote (the record of a deploy on the VM);
    keys unknown to this version are ignored."""
    nested = {}
    for key, value in flat.items():
        parts = key.split(".")
        d = nested
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = value
    o = Options()
    _apply_known(o, nested)
    return o


def _apply_known(obj, data):
    fields = _fields(obj)
    for name, value in data.items():
        if name not in fields:
            continue
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            _apply_known(current, value)
        elif not dataclasses.is_dataclass(current):
            setattr(obj, name, value)


def describe(o: Options):
    """The options as a flat {key.path: value} mapping (for `fab deploy
    --dry-run` and the deploy record on the VM). Holds no secrets."""
    out = {}

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            else:
                out[prefix + f.name] = v
    walk(o, "")
    return out
