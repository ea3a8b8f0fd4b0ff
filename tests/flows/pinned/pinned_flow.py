"""Two steps pinning two versions of the same small pure-Python package, a
foreach whose tasks all need one environment (built once), and a
requirements.txt next to the flow as the base layer."""
from metaflow import FlowSpec, Parameter, pypi, pypi_base, step


def _version(module):
    import importlib

    return importlib.import_module(module).__version__


@pypi_base(packages={"six": "1.16.0"})
class PinnedFlow(FlowSpec):
    @step
    def start(self):
        self.start_six = _version("six")
        self.start_toolz = _version("toolz")  # from requirements.txt
        self.items = [1, 2, 3]
        self.next(self.each, foreach="items")

    @pypi(packages={"six": "1.15.0", "toolz": "0.12.0"})
    @step
    def each(self):
        self.each_six = _version("six")
        self.each_toolz = _version("toolz")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.each_six = sorted({i.each_six for i in inputs})
        self.each_toolz = sorted({i.each_toolz for i in inputs})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PinnedFlow()
