"""What a fork of the warm process changes in Metaflow: the Python processes
Metaflow would start inside a task stay in the task's process.

Metaflow starts helper Pythons inside a task, each importing Metaflow again:
``s3op`` to store more than ten objects (every task does: Metaflow's own
artifacts are a dozen), and, with the metadata service, a heartbeat sidecar.
For a split whose own code takes milliseconds they cost most of its time on a
small machine. The warm process applies these changes after its imports,
before its first fork; each checks what it changes and leaves Metaflow as it
is when that is not there (another Metaflow or botocore).

Part of the bootstrap's source (the first part of the ``python -c``
program): standard library at import; Metaflow and boto3 only when called.
"""

import itertools
import threading


def tune_metaflow():
    for tune in (_small_uploads_in_process, _shared_botocore_loader, _heartbeat_in_process):
        try:
            tune()
        except Exception:  # another Metaflow or botocore: run as they are
            pass


# Up to this many bytes of a task's new artifacts go up from the task's own
# process, one PUT after another.
IN_PROCESS_UPLOAD_BYTES = 64 << 20


def _small_uploads_in_process():
    """Metaflow uploads more than 10 objects at once (a task's artifacts:
    Metaflow's own dozen plus the user's) through a new Python process, s3op,
    which imports Metaflow and boto3 again: 1-2.5 s of a split's 3.8 s on 2
    cores, against about 10 ms a PUT from the task's process. Small uploads
    therefore stay in the task's process (Metaflow's sequential path, the one
    it takes for 10 objects or fewer); big ones keep its parallel uploader."""
    import inspect

    from metaflow.plugins.datastores.s3_storage import S3Storage

    original = S3Storage.save_bytes
    if list(inspect.signature(original).parameters) != [
            "self", "path_and_bytes_iter", "overwrite", "len_hint"]:
        return

    def save_bytes(self, path_and_bytes_iter, overwrite=False, len_hint=0):
        # Take objects until they pass the limit: a big upload's objects
        # still stream to Metaflow's uploader one at a time, as before.
        items, total = [], 0
        path_and_bytes_iter = iter(path_and_bytes_iter)
        for item in path_and_bytes_iter:
            items.append(item)
            total += _size(item[1])
            if total > IN_PROCESS_UPLOAD_BYTES:
                return original(self, itertools.chain(items, path_and_bytes_iter),
                                overwrite=overwrite, len_hint=len_hint)
        return original(self, items, overwrite=overwrite, len_hint=0)

    save_bytes.__doc__ = original.__doc__
    S3Storage.save_bytes = save_bytes


def _size(obj):
    """Bytes of one object of save_bytes (a file object, or one with its
    metadata); unknown sizes count as too big."""
    if isinstance(obj, tuple):
        obj = obj[0]
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if hasattr(obj, "getbuffer"):
        return obj.getbuffer().nbytes
    return float("inf")


def _heartbeat_in_process():
    """With the metadata service, every Metaflow task sends its heartbeats
    from a sidecar: a new Python process that imports Metaflow again (0.4 s of
    CPU a task on 2 cores, for a split whose own code takes milliseconds).
    The sidecar's worker is a thread posting every 10 s; a fork of this
    process runs that worker in the task's own process instead."""
    from metaflow.plugins import SIDECARS
    from metaflow.sidecar import sidecar

    probe = sidecar.Sidecar("heartbeat")
    if not all(hasattr(probe, a) for a in ("_sidecar_type", "_options", "_has_valid_worker",
                                           "sidecar_process", "is_active")):
        return
    original = sidecar.Sidecar.start

    def start(self):
        if self._sidecar_type != "heartbeat" or not self._has_valid_worker or self.is_active:
            return original(self)
        worker_class = SIDECARS[self._sidecar_type].get_worker()
        worker = worker_class(options=self._options) if self._options else worker_class()
        self.sidecar_process = _InProcessSidecar(worker)

    sidecar.Sidecar.start = start
    _quiet_worker_messages(SIDECARS["heartbeat"].get_worker())


def _quiet_worker_messages(worker_class):
    """A sidecar's output goes nowhere unless METAFLOW_DEBUG_SIDECAR is set.
    In the task's process the worker's prints would land in the task's log:
    the metadata service answers a task's first heartbeat with 404 (it
    registered the task a moment ago), and the worker prints that. Its
    module's print is Metaflow's debug switch, as for the sidecar."""
    import builtins
    import sys

    from metaflow.debug import debug

    debugging = debug.__dict__.get("sidecar", False)

    def print_when_debugging(*args, **kwargs):
        if debugging:
            builtins.print(*args, **kwargs)

    sys.modules[worker_class.__module__].print = print_when_debugging


class _InProcessSidecar:
    """What Sidecar expects of its process (send, kill), for a worker that
    runs in this process. Like the sidecar's process, its failures never
    reach the task, and the last heartbeat does not hold up the task's end
    for more than a moment."""

    def __init__(self, worker):
        self.worker = worker
        self.lock = threading.Lock()

    def send(self, msg, retries=3, thread_safe_send=False):
        with self.lock:
            try:
                self.worker.process_message(msg)
            except Exception:
                pass

    def kill(self):
        from metaflow.sidecar import Message, MessageTypes

        last = threading.Thread(target=self.send, args=(Message(MessageTypes.SHUTDOWN, None),),
                                daemon=True)
        last.start()
        last.join(timeout=2)


def _shared_botocore_loader():
    """Metaflow's boto3 client provider makes a new boto3 Session for every
    client, and each Session parses the S3 service model again (0.09 s here,
    against 0.015 s from a loader that has it). The sessions of this process
    and of its forks share one loader, which has read S3's model before the
    first fork. Credentials are dummies: creating a client sends nothing."""
    import functools

    import boto3
    import botocore.session

    botocore.session.create_loader = functools.lru_cache(maxsize=None)(
        botocore.session.create_loader)
    boto3.session.Session().client(
        "s3", region_name="us-east-1", aws_access_key_id="warm",
        aws_secret_access_key="warm", endpoint_url="http://127.0.0.1:9")
