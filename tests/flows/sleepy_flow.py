"""A step that runs until it is cancelled from Airflow."""
import os
import time

from metaflow import FlowSpec, step


class SleepyFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.sleep)

    @step
    def sleep(self):
        print("sleeping pid=%d" % os.getpid(), flush=True)
        time.sleep(600)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SleepyFlow()
