from metaflow import FlowSpec, current, step, trigger_on_finish


@trigger_on_finish(flow="WorkerEventFlow")
class AfterWorkerFlow(FlowSpec):
    """Runs on the main VM when a run of WorkerEventFlow (on a worker VM) succeeds."""

    @step
    def start(self):
        self.upstream = current.trigger.run.pathspec
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    AfterWorkerFlow()
