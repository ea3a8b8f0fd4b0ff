"""A foreach with a two-step body; its width is a parameter (0, 1, 3, or wider
than Airflow's max_map_length)."""
from metaflow import FlowSpec, Parameter, step


class ForeachFlow(FlowSpec):
    width = Parameter("width", default=3, type=int)

    @step
    def start(self):
        self.items = list(range(self.width))
        self.next(self.square, foreach="items")

    @step
    def square(self):
        self.value = self.input * self.input
        self.next(self.plus_one)

    @step
    def plus_one(self):
        self.value += 1
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = [i.value for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        print("values", self.values)


if __name__ == "__main__":
    ForeachFlow()
