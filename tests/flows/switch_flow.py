"""Switch (conditional) steps: basic, nested, inside a branch, inside a
foreach, and recursive."""
from metaflow import FlowSpec, Parameter, step


class SwitchFlow(FlowSpec):
    route = Parameter("route", default="fast")
    loops = Parameter("loops", default=3, type=int)

    @step
    def start(self):
        self.path = ["start"]
        self.next({"fast": self.fast, "slow": self.slow}, condition="route")

    @step
    def fast(self):
        self.path = self.path + ["fast"]
        self.kind = "small" if self.loops < 5 else "big"
        self.next({"small": self.small, "big": self.big}, condition="kind")

    @step
    def small(self):
        self.path = self.path + ["small"]
        self.next(self.fast_done)

    @step
    def big(self):
        self.path = self.path + ["big"]
        self.next(self.fast_done)

    @step
    def fast_done(self):
        self.next(self.merge)

    @step
    def slow(self):
        self.path = self.path + ["slow"]
        self.next(self.merge)

    @step
    def merge(self):
        self.path = self.path + ["merge"]
        self.next(self.branch_a, self.branch_b)

    @step
    def branch_a(self):
        self.side = "even" if self.loops % 2 == 0 else "odd"
        self.next({"even": self.a_even, "odd": self.a_odd}, condition="side")

    @step
    def a_even(self):
        self.branch_result = "a_even"
        self.next(self.a_done)

    @step
    def a_odd(self):
        self.branch_result = "a_odd"
        self.next(self.a_done)

    @step
    def a_done(self):
        self.next(self.branches_join)

    @step
    def branch_b(self):
        self.branch_result = "b"
        self.next(self.branches_join)

    @step
    def branches_join(self, inputs):
        self.branch_results = sorted(i.branch_result for i in inputs)
        self.path = inputs.branch_b.path
        self.next(self.fan_out)

    @step
    def fan_out(self):
        self.items = [1, 2, 3, 4]
        self.next(self.each, foreach="items")

    @step
    def each(self):
        self.parity = "even" if self.input % 2 == 0 else "odd"
        self.next({"even": self.each_even, "odd": self.each_odd}, condition="parity")

    @step
    def each_even(self):
        self.tag_value = "E%d" % self.input
        self.next(self.each_done)

    @step
    def each_odd(self):
        self.tag_value = "O%d" % self.input
        self.next(self.each_done)

    @step
    def each_done(self):
        self.next(self.each_join)

    @step
    def each_join(self, inputs):
        self.tags_seen = [i.tag_value for i in inputs]
        self.path = inputs[0].path
        self.counter = 0
        self.next(self.loop)

    @step
    def loop(self):
        self.counter += 1
        self.state = "again" if self.counter < self.loops else "done"
        self.next({"again": self.loop, "done": self.end}, condition="state")

    @step
    def end(self):
        print("path", self.path, "counter", self.counter)


if __name__ == "__main__":
    SwitchFlow()
