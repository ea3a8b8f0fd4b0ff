"""A step environment for an air-gapped worker VM: jinja2 and its compiled
dependency MarkupSafe come from the bundle's wheelhouse (fab bundle --flows
tests/flows/wheelhouse), in a step routed to the worker's own queue."""

import os

from metaflow import FlowSpec, pypi, step, worker


class WheelhouseFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.render)

    @worker(queue="special")
    @pypi(packages={"jinja2": "3.1.4"})
    @step
    def render(self):
        import jinja2
        import markupsafe

        env = jinja2.Environment(autoescape=True)
        self.html = env.from_string("<p>{{ who }}</p>").render(who="<airflow & metaflow>")
        self.versions = {"jinja2": jinja2.__version__,
                         "markupsafe": markupsafe.__version__}
        self.ran_on = os.environ.get("MFS_WORKER_NAME")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    WheelhouseFlow()
