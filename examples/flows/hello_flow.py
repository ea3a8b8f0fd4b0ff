"""A small Metaflow flow to try the platform with: a parameter, a foreach,
a join, a retry. Nothing here is specific to Airflow."""
from metaflow import FlowSpec, Parameter, retry, step


class HelloFlow(FlowSpec):
    """Squares some numbers in parallel and adds them up."""

    count = Parameter("count", default=5, type=int, help="How many numbers to square")

    @step
    def start(self):
        print("Squaring %d numbers" % self.count)
        self.numbers = list(range(1, self.count + 1))
        self.next(self.square, foreach="numbers")

    @retry(times=1, minutes_between_retries=0)
    @step
    def square(self):
        # An artifact named like its step would be shadowed by the step
        # method when the join reads it (i.square): name it differently.
        self.squared = self.input * self.input
        print("%d squared is %d" % (self.input, self.squared))
        self.next(self.add_up)

    @step
    def add_up(self, inputs):
        self.total = sum(i.squared for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print("The sum of the squares is %d" % self.total)


if __name__ == "__main__":
    HelloFlow()
