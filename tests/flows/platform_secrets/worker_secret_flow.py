import hashlib
import os

from metaflow import FlowSpec, secrets, step, worker


class WorkerSecretFlow(FlowSpec):
    """The same secret in a step that runs on a worker VM's queue."""

    @worker(queue="special")
    @secrets(sources=["metaflow-services.db"])
    @step
    def start(self):
        self.digest = hashlib.sha256(os.environ["DB_PASSWORD"].encode()).hexdigest()
        self.machine = os.environ.get("MFS_WORKER_NAME")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    WorkerSecretFlow()
