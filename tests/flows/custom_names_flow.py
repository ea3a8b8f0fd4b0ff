"""Start and end steps with custom names."""
from metaflow import FlowSpec, step


class CustomNamesFlow(FlowSpec):
    @step(start=True)
    def begin(self):
        self.trail = ["begin"]
        self.next(self.middle)

    @step
    def middle(self):
        self.trail = self.trail + ["middle"]
        self.next(self.finish)

    @step(end=True)
    def finish(self):
        self.trail = self.trail + ["finish"]


if __name__ == "__main__":
    CustomNamesFlow()
