"""A linear flow exercising parameters of every type, @environment, @resources,
@card, stdout/stderr logs and tags."""
import json
import os
import sys

from metaflow import (FlowSpec, IncludeFile, JSONType, Parameter, card, environment,
                      resources, step)


class LinearFlow(FlowSpec):
    count = Parameter("count", default=3, type=int, help="an int")
    ratio = Parameter("ratio", default=0.5, type=float, help="a float")
    flag = Parameter("flag", default=False, type=bool, help="a bool")
    greeting = Parameter("greeting", default="hello", help="a string")
    config_json = Parameter("config-json", default='{"a": 1}', type=JSONType,
                            help="JSON, with a hyphenated name")
    notes = IncludeFile("notes", default="notes.txt", help="a file included at compile time")

    @step
    def start(self):
        print("start stdout line")
        print("start stderr line", file=sys.stderr)
        self.seen = {
            "count": self.count, "ratio": self.ratio, "flag": self.flag,
            "greeting": self.greeting, "config_json": self.config_json,
            "notes": self.notes.strip(),
        }
        self.next(self.a)

    @environment(vars={"MFS_TEST_ENV": "from-environment-decorator"})
    @resources(cpu=1, memory=600)
    @step
    def a(self):
        self.env_value = os.environ.get("MFS_TEST_ENV")
        self.memory_limit = _memory_limit()
        self.cpu_limit = _cpu_limit()
        self.next(self.b)

    @card
    @step
    def b(self):
        self.doubled = self.count * 2
        self.next(self.end)

    @step
    def end(self):
        print("done", self.doubled)


def _memory_limit():
    """The memory limit of this process's cgroup, in bytes, if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                raw = f.read().strip()
            return None if raw == "max" else int(raw)
        except OSError:
            continue
    return None


def _cpu_limit():
    """CPUs this process's cgroup may use (quota / period), if limited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        return None if quota == "max" else int(quota) / int(period)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota < 0 else quota / period
    except OSError:
        return None


if __name__ == "__main__":
    LinearFlow()
