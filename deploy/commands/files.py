"""Commands about files on the VM: written only when they change,
secrets generated once, the certificate, folders and small file
operations."""

from __future__ import annotations

import base64
import shlex

q = shlex.quote

from ..stack import airflow_password_var

# ---------------------------------------------------------------------------
# Files, secrets, certificate
# ---------------------------------------------------------------------------


def read_file(path) -> str:
    return "cat %s 2>/dev/null || true" % q(path)


def write_file(path, content, mode="0644", owner="root:root") -> str:
    """Write *content* (no secrets: it is part of the command) to *path*
    atomically, only if it differs; prints 'unchanged' or 'written'."""
    data = base64.b64encode(content.encode()).decode()
    return install_if_changed("printf %%s %s | base64 -d" % data, path, mode, owner)


def install_uploaded(src, path, mode="0600", owner="root:root") -> str:
    """Move a file uploaded to a private temporary folder into place (for
    files that must not appear on a command line, like a TLS key)."""
    return install_if_changed("cat %s" % q(src), path, mode, owner) + \
        " && rm -rf \"$(dirname %s)\"" % q(src)


def install_if_changed(producer, path, mode, owner) -> str:
    p = q(path)
    tmp = q(path + ".new")
    # A missing folder is made 0755; an existing one keeps its mode (the
    # dags folder is 2775, tls/ private).
    return ("{ [ -d \"$(dirname %s)\" ] || install -d -m 0755 \"$(dirname %s)\"; } && "
            "(umask 077 && %s > %s) && "
            "if cmp -s %s %s; then rm -f %s; echo unchanged; else chmod %s %s && chown %s %s "
            "&& mv -f %s %s && echo written; fi"
            % (p, p, producer, tmp, tmp, p, tmp, mode, tmp, owner, tmp, tmp, p))


def unpack_stack(install_dir, archive, sha, files) -> str:
    """Extract the stack's files into install_dir (replacing them) and record
    the archive's digest; files of an older stack that are gone are removed."""
    d = q(install_dir)
    listed = " ".join(q(f) for f in files)
    return ("install -d -m 0755 %s && old=$(cat %s/.stack-files 2>/dev/null || true) && "
            "tar -C %s --no-same-owner -xf %s && "
            "for f in $old; do case \" %s \" in *\" $f \"*) ;; *) rm -f %s/$f;; esac; done && "
            "printf '%%s\\n' %s > %s/.stack-files && echo %s > %s/.stack-sha256 && rm -f %s"
            % (d, d, d, q(archive), listed, d, listed, d, q(sha), d, q(archive)))


def ensure_secrets(install_dir, secrets) -> str:
    """Append every missing secret to secrets.env (mode 0600, root); existing
    ones are never changed. Prints the names generated (never values)."""
    f = q(install_dir + "/secrets.env")
    gen = {
        # 48 random bytes, base64, only letters and digits kept: about 60
        # characters of which the first N are used.
        "password": "head -c 48 /dev/urandom | base64 | tr -dc A-Za-z0-9 | head -c %d",
        "hex": "head -c %d /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        # Fernet: url-safe base64 of 32 random bytes.
        "fernet": "head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\\n'%.0s",
    }
    lines = ["set -e", "umask 077", "install -d -m 0755 %s" % q(install_dir),
             "touch %s" % f, "chmod 600 %s" % f, "chown root:root %s" % f, "new=''"]
    for s in secrets:
        length = s.length // 2 if s.kind == "hex" else s.length
        cmd = gen[s.kind] % length
        lines.append("grep -q '^%s=' %s || { v=$(%s); [ -n \"$v\" ] && printf '%s=%%s\\n' \"$v\" "
                     ">> %s && new=\"$new %s\"; }" % (s.name, f, cmd, s.name, f, s.name))
    lines.append('if [ -n "$new" ]; then echo "generated:$new"; else echo "all present, skipped"; fi')
    return "\n".join(lines)


def jwt_signing_key(install_dir, uid) -> str:
    """The Ed25519 key Airflow signs its tokens with (API users' and tasks'),
    made once, readable by the airflow user only; it never leaves the main VM
    (worker VMs hold only the edge workers' shared secret). Prints
    'generated' or 'exists', then the key's fingerprint."""
    d = q(install_dir + "/state/airflow-jwt")
    return ("set -e; install -d -m 0700 -o %d -g 0 %s; "
            "if [ -s %s/signing-key.pem ]; then echo exists; else umask 077; "
            "openssl genpkey -algorithm ed25519 -out %s/signing-key.pem.new 2>/dev/null; "
            "chown %d:0 %s/signing-key.pem.new; mv -f %s/signing-key.pem.new %s/signing-key.pem; "
            "echo generated; fi; sha256sum %s/signing-key.pem | cut -c1-16"
            % (uid, d, d, d, uid, d, d, d, d))


def self_signed_cert(install_dir, host, is_ip) -> str:
    """A self-signed certificate for *host*, made once; made again only if the
    host changed (a new public_host)."""
    d = q(install_dir + "/tls")
    # localhost too: `fab tunnel` brings the entry points to this workstation.
    san = (("IP:%s" % host) if is_ip else ("DNS:%s" % host)) + ",DNS:localhost,IP:127.0.0.1"
    return ("install -d -m 0755 %s && "
            "if [ -s %s/cert.pem ] && [ \"$(cat %s/.self-signed-for 2>/dev/null)\" = %s ]; then "
            "echo 'exists, skipped'; else "
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 "
            "-days 3650 -subj %s -addext %s -keyout %s/key.pem.new -out %s/cert.pem.new "
            "2>/dev/null && chmod 600 %s/key.pem.new && chmod 644 %s/cert.pem.new && "
            "mv -f %s/key.pem.new %s/key.pem && mv -f %s/cert.pem.new %s/cert.pem && "
            "echo %s > %s/.self-signed-for && echo 'generated (self-signed)'; fi"
            % (d, d, d, q(host), q("/CN=%s" % host), q("subjectAltName=%s" % san),
               d, d, d, d, d, d, d, d, q(host), d))


def tls_fingerprint(install_dir) -> str:
    return "sha256sum %s/tls/cert.pem %s/tls/key.pem | sha256sum | cut -c1-16" % (
        q(install_dir), q(install_dir))


def assemble_env(install_dir) -> str:
    """.env = settings + secrets (what every `docker compose` in install_dir
    reads), rewritten only if it changed."""
    d = q(install_dir)
    return ("cd %s && umask 077 && cat settings.env secrets.env > .env.new && "
            "if cmp -s .env.new .env; then rm -f .env.new; echo unchanged; "
            "else chmod 600 .env.new && mv -f .env.new .env && echo written; fi" % d)


def airflow_passwords(install_dir, users, uid) -> str:
    """The simple auth manager's passwords file, from the generated secrets
    (owned by the airflow user, which must be able to rewrite it)."""
    d = q(install_dir)
    auth = "%s/state/airflow-auth" % install_dir
    parts = ", ".join('\\"%s\\": \\"%%s\\"' % u for u in users)
    args = " ".join('"$%s"' % airflow_password_var(u) for u in users)
    return ("set -e; cd %s; set -a; . ./secrets.env; set +a; install -d -m 0700 -o %d -g 0 %s; "
            "umask 077; printf \"{%s}\\n\" %s > %s/passwords.json.new; "
            "if cmp -s %s/passwords.json.new %s/passwords.json; then rm -f %s/passwords.json.new; "
            "echo unchanged; else chown %d:0 %s/passwords.json.new && "
            "mv -f %s/passwords.json.new %s/passwords.json && echo written; fi"
            % (d, uid, q(auth), parts, args, q(auth), q(auth), q(auth), q(auth), uid, q(auth),
               q(auth), q(auth)))


def data_dirs(data_dir, uid, group, login_user) -> str:
    """The dags folder under data_dir: writable by the airflow user (whose
    flow-watcher compiles into it) and by members of *group* (users on the
    VM)."""
    dd = q(data_dir)
    add_user = ""
    if login_user and login_user != "root":
        add_user = (" && if ! id -nG %s | tr ' ' '\\n' | grep -qx %s; then usermod -aG %s %s "
                    "&& echo 'added %s to group %s'; fi"
                    % (q(login_user), q(group), q(group), q(login_user), login_user, group))
    return ("(getent group %s >/dev/null || groupadd --system %s) && "
            "install -d -m 0755 %s && install -d -m 2775 -o %d -g %s %s/dags && "
            "chown %d:%s %s/dags && chmod 2775 %s/dags && echo ready%s"
            % (q(group), q(group), dd, uid, q(group), dd, uid, q(group), dd, dd, add_user))


def ship_unless_edited(path, content, owner) -> str:
    """A file fab deploy puts into a users' folder: written when absent or
    still ours (its first line unchanged), kept when a user replaced it;
    prints 'written', 'unchanged' or 'kept (edited on the VM)'."""
    first = content.splitlines()[0]
    return ("if [ ! -e %s ] || head -n 1 %s | grep -qxF %s; then %s; else echo 'kept (edited on "
            "the VM)'; fi" % (q(path), q(path), q(first), write_file(path, content, "0644", owner)))


# What marks a file the compiler or the flow-watcher wrote (spec.render_dag_file,
# watcher._write_error_file): safe to delete, it is generated again.
GENERATED_MARKS = ("Generated by metaflow-services", "placeholder written by")


def migrate_flows_folder(data_dir, check_only=False) -> str:
    """Deployments made before flows lived in the dags folder: moves
    data_dir/flows/* into data_dir/dags/, deletes the DAG files generated at
    the top of dags/ (the flow-watcher writes them again, same DAG ids, into
    dags/.metaflow-services/) and leaves flows as a link to dags, so the old
    path keeps working. Prints "current", "clash: NAMES" (a name in both
    folders that is not generated: nothing changed), "needed" (*check_only*)
    or what it did."""
    marks = " ".join("-e %s" % q(m) for m in GENERATED_MARKS)
    each = ('for p in flows/* flows/.[!.]* flows/..?*; do [ -e "$p" ] || [ -L "$p" ] || continue; '
            'n=${p#flows/}; ')
    generated = 'head -c 4000 "%s" 2>/dev/null | grep -qs ' + marks
    return (
        "set -e; cd %s; if [ -L flows ] || [ ! -d flows ]; then echo current; exit 0; fi; "
        'clash=""; ' + each + 'if [ -e "dags/$n" ] && ! { [ -f "dags/$n" ] && '
        + generated % "dags/$n" + '; }; then clash="$clash $n"; fi; done; '
        'if [ -n "$clash" ]; then echo "clash:$clash"; exit 0; fi; '
        + ("echo needed; exit 0; " if check_only else "") +
        'removed=0; for f in dags/*.py; do [ -f "$f" ] || continue; '
        "if " + generated % "$f" + '; then rm -f "$f"; removed=$((removed+1)); fi; done; '
        "rm -f dags/.metaflow-services/state.json; moved=0; "
        + each + 'mv "$p" dags/; moved=$((moved+1)); done; '
        'rmdir flows && ln -s dags flows && '
        'echo "moved $moved entries of flows/ into dags/; removed $removed generated DAG files"'
    ) % q(data_dir)


def remove_files(*paths) -> str:
    return "rm -f %s" % " ".join(q(p) for p in paths)


def remove_upload(src) -> str:
    """An upload and the private temporary folder put_private made for it."""
    return "rm -rf \"$(dirname %s)\"" % q(src)


def move_into_fresh_folder(src, folder) -> str:
    """*folder* emptied, then holding only *src* (moved in)."""
    return "rm -rf %s && install -d %s && mv %s %s/" % (q(folder), q(folder), q(src), q(folder))


def move_uploaded(src, path, mode) -> str:
    """A large upload (a backup) moved into place as root's, without copying
    it; its private temporary folder removed."""
    return ("mv %s %s && chown root:root %s && chmod %s %s && rmdir \"$(dirname %s)\""
            % (q(src), q(path), q(path), mode, q(path), q(src)))


def private_copy(src, dst, owner) -> str:
    return "install -m 0600 -o %s %s %s" % (q(owner), q(src), q(dst))


def file_size(path) -> str:
    return "stat -c %%s %s" % q(path)


def sha256(path) -> str:
    return "sha256sum %s" % q(path)


def list_files(folder, pattern) -> str:
    """'PATH SIZE MTIME' per file of *folder* matching *pattern* (none: no
    output, also when the folder does not exist)."""
    return ("find %s -maxdepth 1 -name %s -printf '%%p %%s %%T@\\n' 2>/dev/null || true"
            % (q(folder), q(pattern)))


def disk_usage(paths) -> str:
    """For people: the file systems of *paths*, and Docker's own use."""
    return "df -h %s | sed 1d; docker system df" % " ".join(q(p) for p in paths)


def disk_free(paths) -> str:
    """For parsing: `df -P -k` lines of the file systems of *paths*."""
    return "df -P -k %s | sed 1d" % " ".join(q(p) for p in paths)


def short_hostname() -> str:
    return "hostname -s"


def clock() -> str:
    """The VM's time in seconds (with fractions)."""
    return "date +%s.%N"


def remove_in(folder, names) -> str:
    return "cd %s && rm -f -- %s" % (q(folder), " ".join(q(n) for n in names))


def make_dirs(path) -> str:
    return "mkdir -p %s" % q(path)


def publish_upload(tmp, path) -> str:
    """An uploaded file made group-writable and moved over *path* at once
    (a watcher never sees half a file)."""
    return "chmod 0664 %s && mv -f %s %s" % (q(tmp), q(tmp), q(path))


def file_digests(folder) -> str:
    """'SHA256  ./PATH' per file under *folder*, hidden files and caches aside."""
    return ("cd %s && find . -type f ! -path '*/.*' ! -path '*/__pycache__/*' -print0 | "
            "xargs -0 -r sha256sum" % q(folder))


def existing_deployment(install_dir, project) -> str:
    """Prints 'deployed' if install_dir holds a deploy record, 'data' if the
    database volume exists; nothing on a fresh VM."""
    return ("[ -e %s/state/deploy.json ] && echo deployed; command -v docker >/dev/null && "
            "docker volume inspect %s-postgres >/dev/null 2>&1 && echo data; true"
            % (q(install_dir), q(project)))


def remove_stack_files(install_dir, keep) -> str:
    """install_dir emptied except *keep* (names directly in it)."""
    return "cd %s && find . -mindepth 1 -maxdepth 1 %s -exec rm -rf {} +" % (
        q(install_dir), " ".join("! -name %s" % q(k) for k in keep))


def unpack_wheelhouse(archive, folder, sha) -> str:
    """The bundle's wheelhouse replaces *folder* whole (a new one next to it,
    then swapped), marked with the bundle's checksum of it."""
    f, new, old = q(folder), q(folder + ".new"), q(folder + ".old")
    return ("set -e; rm -rf %s %s; install -d -m 0755 %s; tar -C %s --no-same-owner -xf %s; "
            "chmod -R a+rX %s; printf '%%s\\n' %s > %s/.bundle-sha256; "
            "if [ -d %s ]; then mv %s %s; fi; mv %s %s; rm -rf %s"
            % (new, old, new, new, q(archive), new, q(sha), new, f, f, old, new, f, old))


def probe_index(url, ca=None) -> str:
    """The HTTP status of a package index as the VM sees it (000: no answer),
    then curl's error."""
    cacert = "--cacert %s " % q(ca) if ca else ""
    return ("curl -sS -o /dev/null -w '%%{http_code}' --max-time 15 %s%s 2>&1 || true"
            % (cacert, q(url.rstrip("/") + "/")))
