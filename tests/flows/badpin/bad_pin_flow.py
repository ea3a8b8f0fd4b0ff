"""A pin that does not exist: the build must fail with pip's message."""
from metaflow import FlowSpec, pypi, step


class BadPinFlow(FlowSpec):
    @pypi(packages={"six": "0.0.999"})
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    BadPinFlow()
