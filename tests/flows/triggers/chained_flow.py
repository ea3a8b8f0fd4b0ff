from metaflow import FlowSpec, current, step, trigger_on_finish


@trigger_on_finish(flow="TriggerSourceFlow")
class ChainedFlow(FlowSpec):
    """Runs when a run of TriggerSourceFlow succeeds, and reads its rows."""

    @step
    def start(self):
        upstream = current.trigger.run
        self.upstream_pathspec = upstream.pathspec
        self.upstream_rows = len(upstream.data.rows)
        self.event_name = current.trigger.event.name
        self.next(self.end)

    @step
    def end(self):
        # current.trigger is set in every step, not only the first.
        self.end_saw = current.trigger.run.pathspec
        print("triggered by", self.upstream_pathspec)


if __name__ == "__main__":
    ChainedFlow()
