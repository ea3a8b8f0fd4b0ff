# Test equivalent of the deployment's step image (compose/step/Dockerfile):
# what a Metaflow task needs besides the code package (which brings Metaflow
# itself): Python 3, boto3 (S3 datastore) and requests. Built from Debian and
# PyPI because no container registry is reachable on the test machines.
# boto3 comes from PyPI, not Debian: Debian 12's boto3 1.26 hangs for a minute
# uploading empty log files to SeaweedFS.
ARG BASE=mfs-base:bookworm
FROM ${BASE}
COPY host-ca.crt /etc/ssl/host-ca.crt
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/step \
 && PIP_CERT=/etc/ssl/host-ca.crt /opt/step/bin/pip install -q --no-cache-dir \
      "boto3>=1.34,<2" "requests>=2.31,<3"
ENV PATH=/opt/step/bin:$PATH
