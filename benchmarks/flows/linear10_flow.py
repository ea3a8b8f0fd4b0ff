"""Benchmark: 10 linear steps, each recording when its user code started."""
import time

from metaflow import FlowSpec, step


class Linear10Flow(FlowSpec):
    @step
    def start(self):
        self.started = time.time()
        self.next(self.step1)

    @step
    def step1(self):
        self.started = time.time()
        self.next(self.step2)

    @step
    def step2(self):
        self.started = time.time()
        self.next(self.step3)

    @step
    def step3(self):
        self.started = time.time()
        self.next(self.step4)

    @step
    def step4(self):
        self.started = time.time()
        self.next(self.step5)

    @step
    def step5(self):
        self.started = time.time()
        self.next(self.step6)

    @step
    def step6(self):
        self.started = time.time()
        self.next(self.step7)

    @step
    def step7(self):
        self.started = time.time()
        self.next(self.step8)

    @step
    def step8(self):
        self.started = time.time()
        self.next(self.end)

    @step
    def end(self):
        self.started = time.time()


if __name__ == "__main__":
    Linear10Flow()
