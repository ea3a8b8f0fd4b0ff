"""Benchmark of `fab deploy` on a bare VM (the deploy tests' Debian 13 VM):

1. the first deploy from a bundle (Docker installed, images loaded, the stack
   started, the smoke test run),
2. a re-deploy with nothing changed,
3. the idle memory of all the stack's containers together, after five
   minutes without runs.

It lives with the deploy tests because it deploys onto their VM (tests/deploy/
vm.py, the test "cloud provider"). Numbers are printed (and written to
benchmarks/results/deploy.json), not asserted; targets: re-deploy under 30 s, idle memory of the default stack
(the Metaflow metadata service, UI backend and UI included) under 2 GB.

    sudo .venv/bin/python tests/deploy/bench_deploy.py [--idle-seconds 300] [--keep-vm]

Needs what the deploy tests need (root, the host's Docker engine,
debootstrap; see scripts/host-setup). The stack is the default one, with
the deploy tests' images (tests/images/: the Metaflow services built from the
vendored upstream sources, the others from Debian and PyPI).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests" / "deploy"), str(REPO / "tests")]

import deploylab as lab_mod  # noqa: E402  (the deploy tests' lab, used outside pytest)
import vm as vm_mod  # noqa: E402

UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "kB": 1000, "MB": 1e6,
         "GB": 1e9}


def parse_size(text):
    m = re.match(r"([\d.]+)\s*([A-Za-z]+)", text.strip())
    return float(m.group(1)) * UNITS[m.group(2)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle-seconds", type=int, default=300)
    ap.add_argument("--keep-vm", action="store_true")
    args = ap.parse_args(argv)

    results = {}
    t0 = time.time()
    print("building the test images and the bundle ...", flush=True)
    lab_mod.CACHE.mkdir(parents=True, exist_ok=True)
    config = lab_mod.CACHE / "deploy-test.yaml"
    config.write_text(lab_mod.TEST_OPTIONS)
    home = Path(tempfile.mkdtemp(prefix="mfs-bench-home-"))
    lab_mod.build_images()
    image = vm_mod.prepare_image(lab_mod.CACHE)
    bundle = lab_mod.ensure_bundle(config, home)
    results["preparation_seconds"] = round(time.time() - t0, 1)
    results["bundle_mb"] = round(bundle.stat().st_size / 1e6)
    key = lab_mod.ssh_key("id_ed25519")
    vm = vm_mod.BareVM(image, lab_mod.CACHE / "vm-bench", key.with_suffix(".pub").read_text().strip())
    vm.create()
    vm.network_up()
    vm.boot()
    lab = lab_mod.Lab(vm=vm, key=key, wrong_key=key, bundle=bundle, config=config, home=home)
    try:
        res = lab.deploy()
        if res.returncode != 0:
            print(res)
            return 1
        results["first_deploy_seconds"] = round(res.seconds, 1)
        print("first deploy from the bundle: %.0fs" % res.seconds, flush=True)
        res = lab.deploy()
        if res.returncode != 0:
            print(res)
            return 1
        results["redeploy_no_change_seconds"] = round(res.seconds, 1)
        print("re-deploy, nothing changed: %.1fs" % res.seconds, flush=True)
        print("idling %ds ..." % args.idle_seconds, flush=True)
        time.sleep(args.idle_seconds)
        stats = lab.sh("docker stats --no-stream --format '{{.Name}}|{{.MemUsage}}|{{.CPUPerc}}'")
        per = {}
        for line in stats.strip().splitlines():
            name, mem, cpu = line.split("|")
            per[name.replace("metaflow-services-", "").rsplit("-", 1)[0]] = {
                "mem_mb": round(parse_size(mem.split("/")[0]) / 2 ** 20, 1),
                "cpu_percent": float(cpu.rstrip("%"))}
        results["idle_after_seconds"] = args.idle_seconds
        results["idle_memory_mb"] = per
        results["idle_memory_total_mb"] = round(sum(v["mem_mb"] for v in per.values()), 1)
        results["idle_cpu_total_percent"] = round(sum(v["cpu_percent"] for v in per.values()), 1)
    finally:
        if args.keep_vm:
            print("the VM keeps running (%s)" % vm_mod.VM_IP)
        else:
            vm.destroy()

    print("\n%-34s %10s" % ("container (idle)", "memory MB"))
    for name, v in sorted(per.items(), key=lambda kv: -kv[1]["mem_mb"]):
        print("%-34s %10.1f" % (name, v["mem_mb"]))
    print("%-34s %10.1f   (target < 2048)" % ("total", results["idle_memory_total_mb"]))
    print("first deploy from the bundle       %8.1fs" % results["first_deploy_seconds"])
    print("re-deploy, nothing changed         %8.1fs   (target < 30)"
          % results["redeploy_no_change_seconds"])
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "deploy.json").write_text(json.dumps(results, indent=2) + "\n")
    print("written to %s" % (out / "deploy.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
