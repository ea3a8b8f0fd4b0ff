# Test equivalent of netflixoss/metaflow_metadata_service:v2.5.1 (cannot be
# pulled on the test machines), built from the unmodified upstream source in
# ../shared/vendor with the official image's contract:
#   /opt/latest            virtualenv holding the service (`pip install .`)
#   /root/services/...     the source, migration files included
#   /root/run_goose.py     migrations: `/opt/latest/bin/python3 /root/run_goose.py`
#   -m services.metadata_service.server / -m services.ui_backend_service.ui_server
#   curl                   for the healthchecks
# Python 3.11 (Debian 12's), as in the official image (python:3.11-slim).
# goose (a Go binary) cannot be obtained here: metadata.goose.py stands in for
# `goose -dir DIR postgres DSN up`.
ARG BASE=mfs-base:bookworm
FROM ${BASE}
COPY host-ca.crt /etc/ssl/host-ca.crt
COPY metaflow-service-2.5.1.tar.gz /tmp/
# One layer: the C toolchain (upstream asks for psycopg2, a C build, as the
# official image does it) is gone again before the layer is written, and so
# are pip's and apt's caches. metaflow pinned to the version the project is
# tested with (upstream asks for >=2.11.4: the UI backend reads logs and
# artifacts through it).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev gcc \
      libpq-dev libpq5 ca-certificates curl >/dev/null \
 && tar -xzf /tmp/metaflow-service-2.5.1.tar.gz -C /tmp \
 && mkdir -p /root \
 && cp -a /tmp/metaflow-service-2.5.1/services /tmp/metaflow-service-2.5.1/setup.py \
          /tmp/metaflow-service-2.5.1/setup.cfg /tmp/metaflow-service-2.5.1/run_goose.py /root/ \
 && cd /root \
 && python3 -m venv /opt/latest \
 && PIP_CERT=/etc/ssl/host-ca.crt /opt/latest/bin/pip install -q --no-cache-dir \
      "metaflow==2.19.39" . \
 && rm -rf /root/build /root/*.egg-info /tmp/metaflow-service-2.5.1* \
 && apt-get purge -y -qq gcc python3-dev libpq-dev >/dev/null \
 && apt-get autoremove -y -qq >/dev/null \
 && rm -rf /var/lib/apt/lists/* /root/.cache
WORKDIR /root
COPY metadata.goose.py /usr/local/bin/goose
RUN chmod 0755 /usr/local/bin/goose
ENV PATH=/opt/latest/bin:$PATH
CMD ["/opt/latest/bin/python3", "-m", "services.metadata_service.server"]
