"""``@worker(queue="gpu")``: run this step on a worker VM serving that queue.

Read by the compiler only (docs/workers.md); when the flow runs elsewhere
(``python flow.py run`` on a laptop) it does nothing. Shipped inside every
code package: Metaflow only.
"""

from metaflow.decorators import StepDecorator
from metaflow.exception import MetaflowException


class WorkerDecorator(StepDecorator):
    name = "worker"
    defaults = {"queue": None}

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore, logger):
        queue = self.attributes.get("queue")
        if not isinstance(queue, str) or not queue.strip():
            raise MetaflowException(
                "Step %s: @worker needs a queue name, for example @worker(queue=\"gpu\")."
                % step_name)
