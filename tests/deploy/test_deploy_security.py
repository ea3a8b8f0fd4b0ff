"""What an attacker on the network meets on the deployed default stack
(issue 16's security module; the logins themselves are in test_deploy_stack
and test_deploy_metaflow): the S3 endpoint without or with wrong keys,
Airflow tokens that are forged or expired, old TLS versions on every
published port, and the files that hold secrets on the VM; and the flows'
own secrets (`fab secrets.set`, @secrets), which reach their step only.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests

from deploylab import DATA_DIR, INSTALL_DIR, VM_IP

pytestmark = pytest.mark.deploy

PORTS = {"https": 443, "metaflow": 8443, "s3": 9000}
BACKUP_DIR = "/var/backups/metaflow-services"


def s3_client(lab, key=None, secret=None, unsigned=False):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    cfg = Config(s3={"addressing_style": "path"}, signature_version=UNSIGNED if unsigned
                 else "s3v4", retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url="https://%s:9000" % VM_IP, verify=lab.ca,
                        region_name="us-east-1", config=cfg,
                        aws_access_key_id=key or "x", aws_secret_access_key=secret or "x")


def test_the_object_store_refuses_anonymous_and_wrong_keys(deployed, lab):
    from botocore.exceptions import ClientError

    real = lab.s3()
    existing = real.list_objects_v2(Bucket="metaflow", MaxKeys=1)["Contents"][0]["Key"]
    probe = "metaflow/security-probe-%s" % uuid.uuid4().hex
    clients = {"anonymous": s3_client(lab, unsigned=True),
               "wrong secret": s3_client(lab, lab.secret("MFS_S3_ACCESS_KEY"), "wrong"),
               "unknown key": s3_client(lab, "AKIAEXAMPLE", lab.secret("MFS_S3_SECRET_KEY"))}
    for who, c in clients.items():
        for what, call in (("list", lambda: c.list_objects_v2(Bucket="metaflow")),
                           ("get", lambda: c.get_object(Bucket="metaflow", Key=existing)),
                           ("put", lambda: c.put_object(Bucket="metaflow", Key=probe,
                                                        Body=b"x")),
                           ("list buckets", lambda: c.list_buckets())):
            with pytest.raises(ClientError) as e:
                call()
            assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] in (401, 403), \
                (who, what, e.value.response)
    with pytest.raises(ClientError):
        real.head_object(Bucket="metaflow", Key=probe)      # nothing was written


def _token_claims(lab):
    import jwt

    token = lab.airflow_token().json()["access_token"]
    header = jwt.get_unverified_header(token)
    return token, header, jwt.decode(token, options={"verify_signature": False})


def test_airflow_refuses_forged_and_expired_tokens(deployed, lab):
    """Airflow signs with the VM's Ed25519 key (EdDSA): a token made with the
    secret worker VMs hold, or with any other key, or past its expiry, is
    refused by the REST API and by the execution API tasks use."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    url = "https://%s/api/v2/dags" % VM_IP
    token, header, claims = _token_claims(lab)
    assert header["alg"] == "EdDSA", header

    def get(t, where=url):
        r = requests.get(where, headers={"Authorization": "Bearer %s" % t}, verify=lab.ca,
                         timeout=30)
        if r.status_code == 200:
            assert "dags" in r.json()
            return 200
        assert "dags" not in r.text and "DB_" not in r.text, r.text[:300]  # nothing leaks
        return "refused" if r.status_code in (401, 403) else r.status_code

    key = load_pem_private_key(
        (lab.vm.root / INSTALL_DIR.lstrip("/") / "state/airflow-jwt/signing-key.pem").read_bytes(),
        password=None)
    kid = {"kid": header["kid"]}
    now = int(time.time())
    assert get(token) == 200                                 # the real one works
    # The test signs as the VM does: the same claims, re-signed, pass...
    assert get(jwt.encode(claims, key, algorithm="EdDSA", headers=kid)) == 200
    # ...and a stolen token past its expiry does not.
    expired = dict(claims, iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    assert get(jwt.encode(expired, key, algorithm="EdDSA", headers=kid)) == "refused"
    # What a worker VM holds (the edge workers' secret) mints nothing Airflow takes.
    edge_secret = lab.secret("MFS_AIRFLOW_JWT_SECRET")
    for alg, headers in (("HS512", {"kid": "not-used"}), ("HS256", kid)):
        assert get(jwt.encode(claims, edge_secret, algorithm=alg, headers=headers)) == "refused"
    task_claims = {"sub": str(uuid.uuid4()), "aud": "urn:airflow.apache.org:task",
                   "iat": now, "nbf": now, "exp": now + 600}
    variable = "https://%s/execution/variables/mfs_secret__db" % VM_IP
    assert get(jwt.encode(task_claims, edge_secret, algorithm="HS512"), variable) == "refused"
    other_key = Ed25519PrivateKey.generate()
    assert get(jwt.encode(claims, other_key, algorithm="EdDSA", headers=kid)) == "refused"
    assert get(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")) == "refused"
    assert get("") == "refused"


def _handshake(port, version):
    """openssl s_client offering exactly *version* (the client side allows
    old versions: SECLEVEL=0), so a failure is the server's refusal."""
    flag = {"1.0": "-tls1", "1.1": "-tls1_1", "1.2": "-tls1_2", "1.3": "-tls1_3"}[version]
    proc = subprocess.run(["openssl", "s_client", "-connect", "%s:%d" % (VM_IP, port), flag,
                           "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", VM_IP],
                          input="", capture_output=True, text=True, timeout=30,
                          # No system-wide minimum: this machine's client must offer it.
                          env={"PATH": "/usr/bin:/bin", "OPENSSL_CONF": "/dev/null"})
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(PORTS))
def test_only_tls_1_2_and_1_3_are_offered(deployed, lab, name):
    port = PORTS[name]
    for version in ("1.2", "1.3"):
        rc, out = _handshake(port, version)
        assert rc == 0 and "New, TLSv%s, Cipher is " % version in out, \
            (name, version, out[-800:])
    for version in ("1.0", "1.1"):
        rc, out = _handshake(port, version)
        assert rc != 0, (name, version, out[-800:])
        # The server said no (its alert), not this client.
        assert "alert protocol version" in out, (name, version, out[-800:])


def test_every_file_that_holds_a_secret_is_root_only(deployed, lab):
    listing = lab.sh(
        "cd %s && for f in secrets.env .env tls/key.pem; do stat -c '%%n %%a %%U' $f; done; "
        "stat -c '%%n %%a %%u' state/airflow-auth/passwords.json state/airflow-jwt "
        "state/airflow-jwt/signing-key.pem; "
        "stat -c '%%n %%a %%U' %s" % (INSTALL_DIR, BACKUP_DIR)).splitlines()
    modes = {line.split()[0]: line.split()[1:] for line in listing}
    for name in ("secrets.env", ".env", "tls/key.pem"):
        assert modes[name] == ["600", "root"], (name, modes[name])
    assert modes["state/airflow-auth/passwords.json"] == ["600", "50000"]
    assert modes["state/airflow-jwt/signing-key.pem"] == ["600", "50000"]
    assert modes["state/airflow-jwt"] == ["700", "50000"]
    assert modes[BACKUP_DIR] == ["700", "root"]
    # Nothing under the install folder is world-readable that holds a secret.
    secrets = [line.split("=", 1)[1] for line in lab.sh(
        "cat %s/secrets.env" % INSTALL_DIR).splitlines() if "=" in line]
    readable = lab.sh("find %s -type f -perm -o+r" % INSTALL_DIR).split()
    leaked = [f for f in readable
              if any(v in (lab.vm.root / f.lstrip("/")).read_text(errors="replace")
                     for v in secrets if len(v) >= 16)]
    assert leaked == [], leaked

    # The flow-watcher imports users' flow files with the VM's /etc mounted
    # (for owners' names): outside the root group, root-group files stay shut.
    probe = lab.compose("exec -T flow-watcher sh -c 'id -u; id -G; test -r /run/host/etc/passwd "
                        "&& echo passwd; cat /run/host/etc/sudoers >/dev/null 2>&1 || echo shut'")
    assert probe.split() == ["50000", "50000", "passwd", "shut"], probe


SECRET_FLOW = Path(__file__).resolve().parents[1] / "flows" / "platform_secrets" / "secret_flow.py"


def test_a_flow_secret_set_with_fab_reaches_only_its_step(deployed, lab):
    """`fab secrets.set db` (values on standard input), a flow's
    @secrets(sources=["db"]) in the step's container, and the value nowhere
    else on the VM or in what Airflow and Metaflow keep."""
    value = "pw-" + uuid.uuid4().hex
    res = lab.fab("secrets.set", "db", user="root",
                  stdin="# for the orders database\nDB_USER=alice\nDB_PASSWORD=%s\n" % value)
    assert res.returncode == 0, str(res)
    assert "db holds DB_PASSWORD, DB_USER (encrypted in Airflow's database)" in res.output
    listed = lab.fab("secrets.list", "--verbose")
    assert listed.returncode == 0 and "DB_PASSWORD, DB_USER" in listed.output, str(listed)
    for bad, says in (("just-a-password\n", "line 1 of the value of secret db is not KEY=VALUE"),
                      ("", "no value for secret db")):
        refused = lab.fab("secrets.set", "db", stdin=bad)
        assert refused.returncode != 0 and says in refused.output, str(refused)
        assert "nothing was changed on the VM" in refused.output
    dotted = lab.fab("secrets.set", "a.b", stdin="X=1\n")
    assert dotted.returncode != 0 and "'a.b' is not a platform secret name" in dotted.output

    lab.drop_flow(SECRET_FLOW, "SecretFlow")
    run_id, state, tis = lab.run_dag("SecretFlow", {})
    assert state == "success", tis
    from metaflow_services.spec import run_id_for

    seen, others, texts = lab.client(
        "r = Run('SecretFlow/%s')\ntexts = [t.stdout + t.stderr for s in r for t in s]\n"
        "texts += [repr(a.data) for s in r for t in s for a in t]\n"
        "print(json.dumps([r['start'].task.data.seen, r['end'].task.data.others_see, texts]))"
        % run_id_for("SecretFlow", run_id))
    assert seen["user"] == "alice" and seen["digest"] == hashlib.sha256(value.encode()).hexdigest()
    # A file in the step's container, readable by the step's user alone.
    assert (seen["file"], seen["mode"], seen["uid"]) == ("/run/metaflow-services/secrets.json",
                                                        0o400, 50000), seen
    assert others == []
    assert not [t for t in texts if value in t], "in Metaflow's logs or artifacts"

    api, base = lab.airflow(), "https://%s/api/v2/dags/SecretFlow/dagRuns/%s" % (VM_IP, run_id)
    airflow_texts = [tis]
    for ti in api.get(base + "/taskInstances", timeout=30).json()["task_instances"]:
        airflow_texts.append(api.get(base + "/taskInstances/%s/logs/1" % ti["task_id"],
                                     params={"full_content": "true"}, timeout=30).text)
        for x in api.get(base + "/taskInstances/%s/xcomEntries" % ti["task_id"],
                         timeout=30).json()["xcom_entries"]:
            airflow_texts.append(api.get(base + "/taskInstances/%s/xcomEntries/%s"
                                         % (ti["task_id"], x["key"]), timeout=30).text)
    assert len(airflow_texts) > 3 and not [t for t in airflow_texts if value in t]
    row = lab.compose("exec -T -e PGUSER=postgres postgres psql -X -A -t -d airflow -c "
                      "\"SELECT is_encrypted, val FROM variable WHERE key = 'mfs_secret__db'\"")
    assert row.startswith("t|") and value not in row and "DB_USER" not in row, row
    assert lab.sh("docker ps -aq --filter label=metaflow-services=step") == ""
    found = lab.sh("grep -rlsF %s %s %s /tmp /var/tmp /root /home || true"
                   % (value, INSTALL_DIR, DATA_DIR))
    assert found == "", "the value is in files on the VM: %s" % found
    for text in (res.output, listed.output):
        assert value not in text

    gone = lab.fab("secrets.delete", "db")
    assert gone.returncode == 0 and "deleted the platform secret db" in gone.output, str(gone)
    again = lab.fab("secrets.delete", "db")
    assert again.returncode != 0 and "no platform secret db" in again.output, str(again)
