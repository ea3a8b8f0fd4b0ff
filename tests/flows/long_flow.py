"""A run that stays in flight for a while: operations on a busy platform
(backup, restore and upgrade with a run in flight)."""
import time

from metaflow import FlowSpec, Parameter, step


class LongFlow(FlowSpec):
    seconds = Parameter("seconds", default=75, help="how long the wait step runs")

    @step
    def start(self):
        self.next(self.wait)

    @step
    def wait(self):
        print("waiting %d s" % int(self.seconds), flush=True)
        time.sleep(int(self.seconds))
        self.waited = int(self.seconds)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    LongFlow()
