# Test equivalent of the stack's Airflow image (compose/airflow/Dockerfile,
# which is apache/airflow plus this package): the official image cannot be
# pulled on the test machines, so this one is built from Debian and PyPI with
# the same contract: `airflow` on PATH, AIRFLOW_HOME=/opt/airflow owned by the
# airflow user (uid 50000, gid 0), curl for healthchecks, this package with its
# `airflow` extra.
ARG BASE=mfs-base:bookworm
FROM ${BASE}
COPY host-ca.crt /etc/ssl/host-ca.crt
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates curl >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 50000 --gid 0 --create-home --home-dir /home/airflow airflow \
 && mkdir -p /opt/airflow/dags /opt/airflow/logs \
 && chown -R 50000:0 /opt/airflow
# Versions the project is tested with (pyproject.toml bounds); Airflow first,
# in its own layer, so a rebuilt project wheel reuses it.
RUN python3 -m venv /opt/venv \
 && PIP_CERT=/etc/ssl/host-ca.crt /opt/venv/bin/pip install -q --no-cache-dir \
      "apache-airflow==3.3.2" "apache-airflow-providers-edge3==5.1.0" "metaflow==2.19.39" \
      "docker>=7.1,<8" "psycopg[binary]>=3.1,<4" \
      "boto3>=1.34,<2"
COPY metaflow_services-*.whl /tmp/
RUN PIP_CERT=/etc/ssl/host-ca.crt /opt/venv/bin/pip install -q --no-cache-dir \
      "$(ls /tmp/metaflow_services-*.whl)[airflow]" \
 && rm /tmp/metaflow_services-*.whl
ENV PATH=/opt/venv/bin:$PATH AIRFLOW_HOME=/opt/airflow
USER 50000:0
WORKDIR /opt/airflow
