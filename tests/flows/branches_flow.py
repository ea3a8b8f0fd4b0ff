"""Branches, nested branches, joins."""
from metaflow import FlowSpec, step


class BranchesFlow(FlowSpec):
    @step
    def start(self):
        self.x = 1
        self.next(self.left, self.right)

    @step
    def left(self):
        self.x += 10
        self.next(self.join)

    @step
    def right(self):
        self.x += 100
        self.next(self.inner_a, self.inner_b)

    @step
    def inner_a(self):
        self.y = "a"
        self.next(self.inner_join)

    @step
    def inner_b(self):
        self.y = "b"
        self.next(self.inner_join)

    @step
    def inner_join(self, inputs):
        self.x = inputs[0].x
        self.ys = sorted(i.y for i in inputs)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.x for i in inputs)
        self.ys = inputs.right_side.ys if hasattr(inputs, "right_side") else [
            y for i in inputs for y in getattr(i, "ys", [])]
        self.next(self.end)

    @step
    def end(self):
        print("total", self.total)


if __name__ == "__main__":
    BranchesFlow()
