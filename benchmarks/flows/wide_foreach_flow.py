"""Benchmark: an N-way foreach with a trivial body; every task records when its
user code started and ended, so the benchmark can say where the time goes."""
import time

from metaflow import FlowSpec, Parameter, step


class WideForeachFlow(FlowSpec):
    width = Parameter("width", default=300)

    @step
    def start(self):
        self.started = time.time()
        self.items = list(range(int(self.width)))
        self.ended = time.time()
        self.next(self.work, foreach="items")

    @step
    def work(self):
        self.started = time.time()
        self.value = self.input * 2
        self.ended = time.time()
        self.next(self.join)

    @step
    def join(self, inputs):
        self.started = time.time()
        self.total = sum(i.value for i in inputs)
        self.ended = time.time()
        self.next(self.end)

    @step
    def end(self):
        self.started = time.time()
        self.ended = time.time()


if __name__ == "__main__":
    WideForeachFlow()
