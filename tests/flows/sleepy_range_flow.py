"""Ranges of splits that run until the run is cancelled from Airflow."""
import os
import time

from metaflow import FlowSpec, step


class SleepyRangeFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(6))
        self.next(self.sleep, foreach="items")

    @step
    def sleep(self):
        print("split %d sleeping pid=%d" % (self.input, os.getpid()), flush=True)
        time.sleep(600)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SleepyRangeFlow()
