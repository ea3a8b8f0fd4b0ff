"""Benchmark: 5 linear steps in a pinned @pypi_base environment."""
import time

from metaflow import FlowSpec, step, pypi_base


@pypi_base(packages={"six": "1.16.0", "toolz": "0.12.1"})
class Pinned5Flow(FlowSpec):
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
    Pinned5Flow()
