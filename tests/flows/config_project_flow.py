"""Config values fixed at compile time, config_expr, and @project."""
from metaflow import Config, FlowSpec, config_expr, project, step


@project(name="mfs_test")
class ConfigProjectFlow(FlowSpec):
    settings = Config("settings", default_value={"alpha": 7, "name": "cfg"})

    @step
    def start(self):
        self.alpha = self.settings.alpha
        self.name = self.settings["name"]
        self.next(self.end)

    @step
    def end(self):
        from metaflow import current
        self.project_flow_name = current.project_flow_name
        self.branch_name = current.branch_name


if __name__ == "__main__":
    ConfigProjectFlow()
