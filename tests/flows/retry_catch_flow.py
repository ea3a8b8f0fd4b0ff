"""@retry that fails once (on start, so a second _parameters task would show),
@catch on an exception and on a hard crash, @timeout that must kill the step
and everything it started."""
import os
import subprocess
import time

from metaflow import FlowSpec, catch, current, retry, step, timeout


class RetryCatchFlow(FlowSpec):
    @retry(times=2, minutes_between_retries=0)
    @step
    def start(self):
        self.start_attempt = current.retry_count
        if current.retry_count == 0:
            raise RuntimeError("first attempt fails on purpose")
        self.next(self.flaky, self.raises, self.crashes, self.too_slow)

    @retry(times=1, minutes_between_retries=0)
    @step
    def flaky(self):
        self.flaky_attempt = current.retry_count
        if current.retry_count == 0:
            raise RuntimeError("flaky fails on its first attempt")
        self.next(self.join)

    @catch(var="raised")
    @step
    def raises(self):
        raise ValueError("caught by @catch")
        self.next(self.join)

    @catch(var="crashed")
    @step
    def crashes(self):
        print("about to crash hard", flush=True)
        os._exit(3)
        self.next(self.join)

    @catch(var="timed_out")
    @timeout(seconds=5)
    @step
    def too_slow(self):
        # A child process that must not outlive the step.
        child = subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        print("child pid %d" % child.pid, flush=True)
        time.sleep(60)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.flaky_attempt = inputs.flaky.flaky_attempt
        self.raised = str(inputs.raises.raised)
        self.crashed = str(inputs.crashes.crashed)
        self.timed_out = str(inputs.too_slow.timed_out)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RetryCatchFlow()
