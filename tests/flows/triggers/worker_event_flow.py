from metaflow import FlowSpec, current, step, trigger, worker


@trigger(event="worker.ready")
class WorkerEventFlow(FlowSpec):
    """Started by an event; every step runs on the worker VM's queue, so its
    finish event is emitted from the worker (AfterWorkerFlow waits for it)."""

    @worker(queue="special")
    @step
    def start(self):
        self.event_name = current.trigger.event.name
        self.next(self.end)

    @worker(queue="special")
    @step
    def end(self):
        pass


if __name__ == "__main__":
    WorkerEventFlow()
