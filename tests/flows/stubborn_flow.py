"""A step that ignores @timeout's own alarm: the runtime's hard deadline must
kill it (and everything it started)."""
import signal
import time

from metaflow import FlowSpec, step, timeout


class StubbornFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.stuck)

    @timeout(seconds=3)
    @step
    def stuck(self):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # defeats @timeout's alarm
        print("stuck step running", flush=True)
        time.sleep(600)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    StubbornFlow()
