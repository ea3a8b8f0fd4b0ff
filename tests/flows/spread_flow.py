"""Worker tests: a foreach whose tasks spread over the edge workers, a step
routed to one queue, and a step that is slow on its first attempt (the test
kills the worker running it)."""

import os
import time

from metaflow import FlowSpec, Parameter, current, retry, step, worker


class SpreadFlow(FlowSpec):
    width = Parameter("width", default=4)
    hang = Parameter("hang", default=0, help="seconds the first attempt of `slow` sleeps")

    @step
    def start(self):
        self.items = list(range(int(self.width)))
        self.next(self.body, foreach="items")

    @step
    def body(self):
        time.sleep(3)  # long enough that one worker cannot take every split
        self.square = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.square for i in inputs)
        self.next(self.special)

    @worker(queue="special")
    @step
    def special(self):
        self.next(self.slow)

    @retry(times=1, minutes_between_retries=0)
    @step
    def slow(self):
        if current.retry_count == 0 and int(self.hang):
            time.sleep(int(self.hang))
        self.ran_on = os.environ.get("MFS_WORKER_NAME")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SpreadFlow()
