"""Benchmark: a 100-way foreach, each task recording when its user code started."""
import time

from metaflow import FlowSpec, step


class Foreach100Flow(FlowSpec):
    @step
    def start(self):
        self.started = time.time()
        self.items = list(range(100))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        self.started = time.time()
        self.value = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.started = time.time()
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        self.started = time.time()


if __name__ == "__main__":
    Foreach100Flow()
