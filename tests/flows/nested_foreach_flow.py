"""Three levels of foreach, with a split inside the innermost body."""
from metaflow import FlowSpec, step


class NestedForeachFlow(FlowSpec):
    @step
    def start(self):
        self.outer = ["a", "b"]
        self.next(self.level1, foreach="outer")

    @step
    def level1(self):
        self.l1 = self.input
        self.middle = [1, 2, 3] if self.l1 == "a" else [4]
        self.next(self.level2, foreach="middle")

    @step
    def level2(self):
        self.l2 = self.input
        self.inner = list(range(self.l2 % 3 + 1))
        self.next(self.level3, foreach="inner")

    @step
    def level3(self):
        self.l3 = self.input
        self.next(self.left, self.right)

    @step
    def left(self):
        self.part = "L"
        self.next(self.split_join)

    @step
    def right(self):
        self.part = "R"
        self.next(self.split_join)

    @step
    def split_join(self, inputs):
        self.merge_artifacts(inputs, exclude=["part"])
        self.label = "%s%s%s%s" % (self.l1, self.l2, self.l3,
                                     "".join(sorted(i.part for i in inputs)))
        self.next(self.join3)

    @step
    def join3(self, inputs):
        self.labels = [i.label for i in inputs]
        self.next(self.join2)

    @step
    def join2(self, inputs):
        self.labels = [l for i in inputs for l in i.labels]
        self.next(self.join1)

    @step
    def join1(self, inputs):
        self.labels = [l for i in inputs for l in i.labels]
        self.next(self.end)

    @step
    def end(self):
        print("labels", self.labels)


if __name__ == "__main__":
    NestedForeachFlow()
