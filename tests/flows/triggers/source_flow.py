from metaflow import FlowSpec, Parameter, step


class TriggerSourceFlow(FlowSpec):
    """The upstream flow of the trigger tests: when a run succeeds,
    ChainedFlow (its @trigger_on_finish) runs."""

    size = Parameter("size", default=3, type=int)

    @step
    def start(self):
        self.rows = list(range(self.size))
        self.next(self.end)

    @step
    def end(self):
        print("made", len(self.rows), "rows")


if __name__ == "__main__":
    TriggerSourceFlow()
