"""Benchmark: 5 linear steps."""
import time

from metaflow import FlowSpec, step


class Plain5Flow(FlowSpec):
    @step
    def start(self):
        self.started = time.time()
        self.next(self.s1)

    @step
    def s1(self):
        self.started = time.time()
        self.next(self.s2)

    @step
    def s2(self):
        self.started = time.time()
        self.next(self.s3)

    @step
    def s3(self):
        self.started = time.time()
        self.next(self.end)

    @step
    def end(self):
        self.started = time.time()


if __name__ == "__main__":
    Plain5Flow()
