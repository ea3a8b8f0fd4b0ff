"""A step environment from a private package index whose certificate only
the test's own CA signs (deploy option packages.ca_bundle)."""

from metaflow import FlowSpec, pypi, step


class IndexedFlow(FlowSpec):
    @pypi(packages={"toolz": "0.12.1"})
    @step
    def start(self):
        import toolz

        self.toolz = toolz.__version__
        self.firsts = list(toolz.take(3, toolz.iterate(lambda x: x * 2, 1)))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    IndexedFlow()
