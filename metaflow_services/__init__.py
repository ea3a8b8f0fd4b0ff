"""metaflow-services: the whole Metaflow platform on one VM.

Modules: ``compiler`` (flow -> spec, inside Metaflow's CLI), ``spec`` (the
versioned contract), ``dag`` (spec -> Airflow DAG, parse time), ``runtime``
(one Airflow task instance), ``executors`` (docker / subprocess),
``bootstrap`` (runs inside the executor), ``config`` (worker settings),
``cli`` (the ``metaflow-services`` command).
"""

__version__ = "0.1.0"
