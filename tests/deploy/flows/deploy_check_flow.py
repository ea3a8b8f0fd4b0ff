"""Dropped into the deployed stack by the deploy tests: a foreach (three
step containers at once with the docker executor), a parameter and
artifacts the test reads back from the object store."""
from metaflow import FlowSpec, Parameter, step


class DeployCheckFlow(FlowSpec):
    n = Parameter("n", type=int, default=3)

    @step
    def start(self):
        self.items = list(range(self.n))
        self.next(self.square, foreach="items")

    @step
    def square(self):
        self.value = self.input * self.input
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.value for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total)


if __name__ == "__main__":
    DeployCheckFlow()
