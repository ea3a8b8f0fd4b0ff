"""Five trivial steps in a row: what counts is the time between them."""
from metaflow import FlowSpec, step


class RelayFlow(FlowSpec):
    @step
    def start(self):
        self.hops = 1
        self.next(self.b)

    @step
    def b(self):
        self.hops += 1
        self.next(self.c)

    @step
    def c(self):
        self.hops += 1
        self.next(self.d)

    @step
    def d(self):
        self.hops += 1
        self.next(self.end)

    @step
    def end(self):
        self.hops += 1


if __name__ == "__main__":
    RelayFlow()
