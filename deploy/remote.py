"""Running the built commands on the VM, and the one error boundary.

``Remote`` wraps a Fabric connection: every command runs as root (directly,
or through ``sudo -n`` for an admin user with passwordless sudo, or Fabric's
sudo with a password given by --prompt-for-sudo-password), with a clean
environment, no stdin unless given, and its output hidden unless --verbose.

``boundary`` turns every failure into one line: what failed, on which host,
what to do; the traceback only with --verbose.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import socket
import sys
import time
import traceback

from invoke.exceptions import Exit

from metaflow_services.errors import ExitCode, ServicesError

from .config import ConfigError


class DeployError(ServicesError):
    """A failure of a deploy command the user can act on: *what* failed and
    *fix*, what to do."""


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


class Out:
    """Step headings and result lines; plain text when not on a terminal."""

    def __init__(self, verbose=False, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self.color = self.stream.isatty() and not os.environ.get("NO_COLOR")
        self.t0 = time.time()
        self.step_t0 = self.t0

    def _c(self, code, text):
        return "\033[%sm%s\033[0m" % (code, text) if self.color else text

    def step(self, title):
        if os.environ.get("MFS_DEPLOY_TIMINGS"):
            self.stream.write("    (%.1fs)\n" % (time.time() - self.step_t0))
        self.step_t0 = time.time()
        self.stream.write(self._c("1", "==> %s" % title) + "\n")
        self.stream.flush()

    def ok(self, text):
        self.stream.write("    %s %s\n" % (self._c("32", "ok"), text))
        self.stream.flush()

    def info(self, text):
        self.stream.write("    %s\n" % text)
        self.stream.flush()

    def warn(self, text):
        self.stream.write("    %s %s\n" % (self._c("33", "warning:"), text))
        self.stream.flush()

    def elapsed(self):
        return time.time() - self.t0


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class Remote:
    def __init__(self, c, out: Out):
        self.c = c
        self.out = out
        self.host = self.describe(c)
        self.sudo_mode = None      # "root", "sudo" (passwordless) or "fabric" (password)
        self.user = None

    @staticmethod
    def describe(c):
        port = "" if c.port == 22 else ":%s" % c.port
        return "%s@%s%s" % (c.user, c.host, port)

    def _run(self, cmd, as_root, hide, timeout, warn, raw=False):
        kwargs = dict(hide=hide, warn=warn, in_stream=False, timeout=timeout, env={})
        if not hide and not raw:
            # Streamed output (progress of long commands), indented under the
            # step's heading.
            kwargs["out_stream"] = kwargs["err_stream"] = _Indented(self.out.stream)
        if self.out.verbose:
            self.out.info("$ %s%s" % ("(root) " if as_root else "", cmd if len(cmd) < 400
                                      else cmd[:400] + " ..."))
            kwargs["hide"] = False
        if not as_root or self.sudo_mode == "root":
            return self.c.run("sh -c %s" % shlex.quote(cmd), **kwargs)
        if self.sudo_mode == "fabric":
            return self.c.sudo("sh -c %s" % shlex.quote(cmd), **kwargs)
        return self.c.run("sudo -n sh -c %s" % shlex.quote(cmd), **kwargs)

    def run(self, cmd, as_root=True, hide=True, timeout=None, warn=False, what=None, raw=False):
        """Run *cmd*; on failure raise DeployError naming *what* and the
        command's last error lines. Data for the VM goes into the command or
        through SFTP, not stdin (invoke feeds stdin a byte at a time)."""
        t0 = time.time()
        try:
            for attempt in range(1, TRANSIENT_TRIES + 1):
                r = self._run(cmd, as_root, hide, timeout, True, raw)
                if not (r.exited and _transient(r)) or attempt == TRANSIENT_TRIES:
                    break
                self.out.warn("Docker's runtime failed to start a process (%s); trying again"
                              % TRANSIENT_SIGNATURE)
                time.sleep(2 * attempt)
            if r.exited and not warn:
                detail = _tail(r.stderr) or _tail(r.stdout)
                raise DeployError("%s failed (exit %d)%s"
                                  % (what or "a remote command", r.exited,
                                     ": " + detail if detail else ""),
                                  "run again with --verbose to see the command and its output")
            return r
        finally:
            if os.environ.get("MFS_DEPLOY_TIMINGS"):
                self.out.info("[%.2fs] %s" % (time.time() - t0, what or cmd[:60]))

    def stdout(self, cmd, **kw):
        return self.run(cmd, **kw).stdout

    def put_private(self, local_path, name):
        """Upload into a new folder only the login user can read; returns the
        remote path (install_uploaded moves it into place and removes it)."""
        d = self.stdout("mktemp -d", as_root=False, what="creating a temporary folder").strip()
        self.put_file(local_path, "%s/%s" % (d, name))
        return "%s/%s" % (d, name)

    def put_file(self, local_path, remote_path, progress=None):
        """Upload to a path the login user can write (then move it as root)."""
        # Fabric keeps one SFTP session per connection: do not close it.
        self.c.sftp().put(str(local_path), remote_path, callback=progress)


# runc's init process died before it ran anything (seen intermittently with
# Docker 26 on a busy machine). Nothing was started, so running the same
# command again is always safe, and it then succeeds.
TRANSIENT_SIGNATURE = "read init-p: connection reset by peer"
TRANSIENT_TRIES = 3


def _transient(result):
    return TRANSIENT_SIGNATURE in (result.stderr or "") + (result.stdout or "")


class _Indented:
    def __init__(self, stream, prefix="    "):
        self.stream = stream
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text):
        out = []
        for ch in text:
            if self.at_line_start and ch != "\n":
                out.append(self.prefix)
            out.append(ch)
            self.at_line_start = ch == "\n"
        self.stream.write("".join(out))

    def flush(self):
        self.stream.flush()


def _tail(text, n=3):
    lines = []
    for ln in (text or "").strip().splitlines():
        # Compose repeats an error once per dependent container.
        ln = re.sub(r"^Container \S+\s+", "", ln.strip())
        if ln and ln not in lines:
            lines.append(ln)
    return " | ".join(lines[-n:])


# ---------------------------------------------------------------------------
# The error boundary
# ---------------------------------------------------------------------------


def translate(e, host):
    """(what, fix) for an exception from connecting or running."""
    import paramiko

    if isinstance(e, ConfigError):
        return str(e), e.fix or "fix the option (deploy.example.yaml documents each one)"
    if isinstance(e, ServicesError):
        return e.what, e.fix
    if isinstance(e, paramiko.AuthenticationException):
        return ("SSH authentication failed: %s" % e,
                "check the user in -H user@host and the key (-i KEY, ssh-agent or ~/.ssh/config)")
    if isinstance(e, paramiko.BadHostKeyException):
        return ("the VM's SSH host key does not match known_hosts",
                "if the VM was rebuilt, remove its old key: ssh-keygen -R %s"
                % host.split("@")[-1].split(":")[0])
    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        return ("cannot connect: %s" % _reason(e),
                "check the address and port, and that sshd runs on the VM")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return ("cannot connect: timed out",
                "check the address, the network path and firewalls")
    if isinstance(e, socket.gaierror):
        return ("cannot resolve the host name of %s: %s" % (host, e.strerror),
                "check the host name")
    if isinstance(e, (OSError, paramiko.SSHException)):
        return ("SSH failed: %s" % e, "check the address and that sshd runs")
    if isinstance(e, KeyboardInterrupt):
        return ("interrupted", "run the task again: every step is safe to repeat")
    return ("unexpected error: %s: %s" % (type(e).__name__, e),
            "run again with --verbose for the traceback")


def exit_code(e) -> ExitCode:
    import paramiko

    if isinstance(e, ServicesError):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(e, (OSError, paramiko.SSHException)):
        return ExitCode.UNREACHABLE
    return ExitCode.FAILED


def _reason(e):
    errors = getattr(e, "errors", {}) or {}
    for err in errors.values():
        return getattr(err, "strerror", None) or str(err)
    return str(e)


def boundary(task_name):
    """Decorator for the body of a Fabric task: one clear line per failure."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(c, *args, **kwargs):
            verbose = bool(kwargs.get("verbose")) or os.environ.get("MFS_VERBOSE") == "1"
            host = Remote.describe(c) if getattr(c, "host", None) else "this workstation"
            try:
                return fn(c, *args, **kwargs)
            except Exit:
                raise
            except BaseException as e:  # noqa: BLE001 - this is the boundary
                what, fix = translate(e, host)
                if verbose and not isinstance(e, ServicesError):
                    traceback.print_exc()
                # One line: what failed, where, what to do.
                msg = "fab %s on %s: %s" % (task_name, host, what)
                if fix:
                    msg += "; what to do: %s" % fix
                raise Exit(msg, code=int(exit_code(e)))
        return inner
    return wrap
