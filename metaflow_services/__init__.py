"""metaflow-services: the whole Metaflow platform on one VM.

Compiling (inside Metaflow's CLI): ``compiler`` (flow -> spec, the code
package), ``refusals`` (what one VM cannot do; CompileError), ``step_spec``
(a step and its environment), ``run_inputs`` (parameters, schedule, owner).
The contract: ``spec`` (versioned; ids, the DAG file writer).
Running: ``dag`` (spec -> Airflow DAG, parse time), ``routing`` (steps to
worker queues), ``runtime`` (one Airflow task instance), ``executors``
(docker / subprocess), ``bootstrap`` (runs inside the executor), ``images``
(step environment images), ``config`` (worker settings).
Operating the stack: ``health`` (the doctor command) with ``checks``,
``smoke`` and ``workstation``; ``objectstore`` (the S3 client); ``backup`` and
``archive``; ``maintenance``; ``watcher`` (flows folder -> DAGs); ``workers``
(sync with worker VMs); ``local`` (the stack on loopback).
Shared: ``errors`` (ServicesError, exit codes); ``cli`` (the
``metaflow-services`` command).
"""

__version__ = "0.1.0"
