from metaflow import FlowSpec, Parameter, current, step, trigger


@trigger(event={"name": "table.ready", "parameters": {"table": "table_name", "rows": "row_count"}})
class EventFlow(FlowSpec):
    """Runs when the event table.ready is published; its payload's table_name
    and row_count fields become the parameters table and rows."""

    table = Parameter("table", default="nothing")
    rows = Parameter("rows", default=0, type=int)

    @step
    def start(self):
        self.event_name = current.trigger.event.name
        self.event_type = current.trigger.event.type
        self.seen = "%s:%d" % (self.table, self.rows)
        self.next(self.end)

    @step
    def end(self):
        print("table", self.table, "rows", self.rows)


if __name__ == "__main__":
    EventFlow()
