from metaflow import FlowSpec, Parameter, step


class DeployerFlow(FlowSpec):
    """Deployed with Metaflow's Deployer API in the tests: doubles alpha."""

    alpha = Parameter("alpha", default=1, type=int)

    @step
    def start(self):
        self.result = self.alpha * 2
        self.next(self.end)

    @step
    def end(self):
        print("result", self.result)


if __name__ == "__main__":
    DeployerFlow()
