"""A foreach wide enough that each mapped task instance runs a range of
splits; split 3 fails on its first attempt and is retried alone."""
import os

from metaflow import FlowSpec, current, retry, step


class RangesFlow(FlowSpec):
    @step
    def start(self):
        self.items = list(range(10))
        self.next(self.work, foreach="items")

    @retry(times=1, minutes_between_retries=0)
    @step
    def work(self):
        print("split %d attempt %d" % (self.input, current.retry_count), flush=True)
        self.pid, self.ppid = os.getpid(), os.getppid()
        if self.input == 3 and current.retry_count == 0:
            raise RuntimeError("split 3 fails on its first attempt")
        self.value = self.input * 10
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = [i.value for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RangesFlow()
