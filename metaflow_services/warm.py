"""The warm process of a step's container: Python with Metaflow and the
flow's imports loaded once, forking one child per Metaflow command.

Part of the bootstrap's source (sent ahead of ``bootstrap.py`` in the same
``python -c`` program, after ``warm_tuning.py``): standard library only. The
bootstrap starts it as a second copy of itself with ``MFS_WARM_FD`` set; the
two talk over a SOCK_SEQPACKET socket pair. A request is JSON (argv, environment, working
folder) with the child's stdout and stderr as passed file descriptors; the
answers are the child's pid when it forked and its exit status when it ended.

A child is what ``python flow.py ARGS`` or ``python -m MODULE ARGS`` would
be, minus the interpreter start and the imports: it starts a session of its
own, takes the request's environment, folder and argv, reseeds the random
generators a fork would otherwise share, and runs the flow file (or module) as
``__main__``; the interpreter then exits as usual (atexit handlers, threads).
"""

import ast
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

try:  # imported as a module; run as `python -c`, warm_tuning.py's source came first
    from .warm_tuning import tune_metaflow
except ImportError:
    pass

# The bootstrap's source travels in an environment variable rather than on the
# command line, so `ps` and `docker top` show a short command.
BOOTSTRAP_ENV = "MFS_BOOTSTRAP"
# (Not popped here: the bootstrap keeps the source to start its warm process.)
BOOTSTRAP_CODE = ("import os; exec(compile(os.environ[%r], 'metaflow-services-bootstrap', "
                  "'exec'))" % BOOTSTRAP_ENV)
WARM_FD_ENV = "MFS_WARM_FD"
WARM_FLOW_ENV = "MFS_WARM_FLOW"
_MAX_MESSAGE = 4 << 20
_OWN_FRAMES = ("<string>", "metaflow-services-bootstrap", __file__ if "__file__" in globals() else "")
# Loaded before the first fork: what `python flow.py step` and save_logs
# import on their way to the user's code. Not metaflow.cli: importing it adds
# the flow's Config options to the CLI, so it must come after the flow class.
_METAFLOW_MODULES = (
    "metaflow.task", "metaflow.datastore",
    "metaflow.plugins.datastores.s3_storage", "metaflow.plugins.metadata_providers.service",
    "metaflow.mflog.save_logs", "metaflow.plugins.datatools.s3", "boto3",
)


class WarmUnavailable(Exception):
    """No warm process here (an old Python, or it failed to start)."""


# ---------------------------------------------------------------------------
# The bootstrap's side
# ---------------------------------------------------------------------------


class Launcher:
    """Starts Python commands of the step: forks of the warm process when it
    runs, else new Python processes. Either way each command is a session of
    its own, so @timeout and cancel can kill everything it started."""

    def __init__(self, env, flow_file, source, out):
        self.env = env
        self.python = sys.executable or "python3"
        self.warm = None
        self.note = "a new Python process per command"
        if source and env.get("MFS_WARM_PROCESS", "1") != "0":
            try:
                self.warm = WarmProcess(self.python, env, flow_file, source)
                self.note = "warm process ready in %.2fs" % self.warm.ready_seconds
            except WarmUnavailable as e:
                self.note = "%s: a new Python process per command" % e
                out.line("[metaflow-services] No warm process (%s); each Metaflow command "
                         "starts a new Python." % e, sys.stderr)

    def describe(self):
        return self.note

    def start(self, argv, extra_env, cwd):
        env = dict(self.env)
        env.update(extra_env)
        if self.warm is not None and self.warm.alive():
            try:
                return self.warm.start(argv, env, cwd)
            except WarmUnavailable:
                pass  # it died (said on stderr): the rest runs cold
        return subprocess.Popen(
            [self.python] + argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def call(self, argv, extra_env, cwd):
        """Runs a short command to its end: (exit code, its output)."""
        proc = self.start(argv, extra_env, cwd)
        chunks = []
        reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
        reader.start()
        out = proc.stdout.read()
        reader.join()
        proc.stdout.close()
        proc.stderr.close()
        return proc.wait(), (out + b"".join(chunks)).decode("utf-8", "replace")

    def close(self):
        if self.warm is not None:
            self.warm.close()


class WarmProcess:
    def __init__(self, python, env, flow_file, source, timeout=300):
        if not hasattr(socket, "send_fds") or not hasattr(os, "waitstatus_to_exitcode"):
            raise WarmUnavailable("Python %d.%d cannot pass file descriptors"
                                  % sys.version_info[:2])
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        wenv = dict(env, **{BOOTSTRAP_ENV: source, WARM_FD_ENV: str(theirs.fileno()),
                            WARM_FLOW_ENV: flow_file})
        t0 = time.time()
        self.proc = subprocess.Popen(
            [python, "-c", BOOTSTRAP_CODE], env=wenv, pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL, cwd=os.path.dirname(flow_file) or None)
        theirs.close()
        self.sock = mine
        self.lock = threading.Lock()
        self.calls = {}
        self.next_id = 0
        self.dead = False
        mine.settimeout(timeout)
        try:
            ready = json.loads(mine.recv(_MAX_MESSAGE) or b"{}")
        except (OSError, ValueError) as e:
            ready = {"error": str(e)}
        mine.settimeout(None)
        if not ready.get("ready"):
            self.close()
            raise WarmUnavailable("the warm process did not start (%s)"
                                  % (ready.get("error") or "it exited"))
        self.ready_seconds = time.time() - t0
        threading.Thread(target=self._read_answers, daemon=True).start()

    def alive(self):
        return not self.dead

    def start(self, argv, env, cwd):
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        call = {"pid": None, "code": None, "forked": threading.Event(),
                "ended": threading.Event()}
        try:
            with self.lock:
                self.next_id += 1
                call_id = self.next_id
                self.calls[call_id] = call
                request = json.dumps({"id": call_id, "argv": argv, "env": env, "cwd": cwd})
                socket.send_fds(self.sock, [request.encode()], [out_w, err_w])
        except OSError as e:
            self._fail_all("the warm process is gone (%s)" % e)
        finally:
            os.close(out_w)
            os.close(err_w)
        call["forked"].wait()
        if call["pid"] is None:
            os.close(out_r)
            os.close(err_r)
            raise WarmUnavailable("the warm process could not start a command")
        return _Forked(call, os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"))

    def _read_answers(self):
        while True:
            try:
                msg = self.sock.recv(_MAX_MESSAGE)
            except OSError:
                msg = b""
            if not msg:
                self._fail_all("the warm process ended")
                return
            answer = json.loads(msg)
            with self.lock:
                call = self.calls.get(answer["id"])
            if call is None:
                continue
            if "pid" in answer:
                call["pid"] = answer["pid"]
                call["forked"].set()
            else:
                call["code"] = answer["code"]
                with self.lock:
                    self.calls.pop(answer["id"], None)
                call["ended"].set()

    def _fail_all(self, why):
        """The warm process died (out of memory, killed): its children are
        orphans whose exit status nobody will learn; stop them and fail them."""
        with self.lock:
            self.dead = True
            calls, self.calls = list(self.calls.values()), {}
        for call in calls:
            if call["pid"]:
                try:
                    os.killpg(call["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            call["code"] = -signal.SIGKILL
            call["forked"].set()
            call["ended"].set()
        if calls:
            sys.stderr.write("[metaflow-services] %s while %d command(s) ran.\n" % (why, len(calls)))

    def close(self):
        # shutdown first: the answers thread is blocked in recv on this socket,
        # which keeps it open after close(), so the warm process would see no
        # end of its input and every task would wait out the 10 s below.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Forked:
    """A child of the warm process, as much of a Popen as the runner uses."""

    def __init__(self, call, stdout, stderr):
        self.call = call
        self.pid = call["pid"]
        self.stdout = stdout
        self.stderr = stderr

    def poll(self):
        return self.call["code"] if self.call["ended"].is_set() else None

    def wait(self, timeout=None):
        if not self.call["ended"].wait(timeout):
            raise subprocess.TimeoutExpired("metaflow command", timeout)
        return self.call["code"]


# ---------------------------------------------------------------------------
# The warm process
# ---------------------------------------------------------------------------


def warm_main():
    sock = socket.socket(fileno=int(os.environ.pop(WARM_FD_ENV)))
    flow_file = os.environ.pop(WARM_FLOW_ENV)
    sys.path[0:1] = [os.path.dirname(flow_file)]
    main = vars(sys.modules["__main__"])
    before = set(main)
    try:
        _preload(flow_file)
    except BaseException as e:  # Metaflow itself does not import: say so, run cold
        sock.send(json.dumps({"error": "importing Metaflow failed: %r" % e}).encode())
        return
    # What the imports put on __main__ (Metaflow puts its ForeachFrame there so
    # that pickles find it): the flow runs in a new __main__, which needs them.
    extras = {k: v for k, v in main.items() if k not in before}
    if threading.active_count() > 1:
        # Forking a process with threads can copy a lock some thread held.
        sock.send(json.dumps({"error": "the flow's imports started threads"}).encode())
        return
    # The bootstrap stops the commands (SIGTERM to each one's session, then
    # SIGKILL): a signal to the whole process group must not kill this
    # process first, or its children would be killed without their grace.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    sock.send(json.dumps({"ready": True}).encode())
    children = {}
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        if sock in readable:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 2)
            except OSError:
                msg, fds = b"", []
            if not msg:
                break  # the bootstrap is gone
            request = json.loads(msg)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sock.close()
                for fd in (wake_r, wake_w):
                    os.close(fd)
                _child(request, fds, extras)  # raises SystemExit: the interpreter exits
            for fd in fds:
                os.close(fd)
            children[pid] = request["id"]
            sock.send(json.dumps({"id": request["id"], "pid": pid}).encode())
        _reap(children, sock)
    for pid in children:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    # Nothing of this process outlives it (its children are sessions of their
    # own): skip the interpreter's teardown of Metaflow and boto3, 0.15 s
    # that every step's container would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _reap(children, sock):
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        call_id = children.pop(pid, None)
        if call_id is not None:
            sock.send(json.dumps({"id": call_id,
                                  "code": os.waitstatus_to_exitcode(status)}).encode())


def _preload(flow_file):
    import importlib

    importlib.import_module("metaflow")
    for name in _METAFLOW_MODULES + tuple(_flow_imports(flow_file)):
        try:
            importlib.import_module(name)
        except BaseException:  # the step itself will say what is wrong
            pass
    tune_metaflow()


def _flow_imports(flow_file):
    """The modules the flow file imports at its top level."""
    try:
        with open(flow_file, "rb") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


def _child(request, fds, extras):
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(fds[0], 1)
    os.dup2(fds[1], 2)
    for fd in list(fds) + [devnull]:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    _reseed()
    argv = request["argv"]
    import runpy

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]
            runpy.run_module(argv[1], init_globals=extras, run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(argv[0])
            runpy.run_path(argv[0], init_globals=extras, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as e:
        # What `python flow.py` prints: the traceback from the user's file on,
        # without this process's own frames.
        import traceback

        tb = e.__traceback__
        while tb is not None and (tb.tb_frame.f_code.co_filename in _OWN_FRAMES
                                  or "runpy" in tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb or e.__traceback__)
        sys.exit(1)
    sys.exit(0)


def _reseed():
    # random reseeds itself after a fork; numpy's global generator would not,
    # and every split of a foreach would draw the same numbers.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed()
        except Exception:
            pass
