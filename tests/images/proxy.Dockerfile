# Test equivalent of the official nginx image the stack's proxy uses (cannot be
# pulled on the test machines): Debian's nginx with the same contract, i.e.
# `nginx` on PATH, mime.types in /etc/nginx, an "nginx" user for the workers,
# busybox-compatible wget and base64 for the healthcheck and start script.
ARG BASE=mfs-base:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends nginx wget >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system nginx && useradd --system --gid nginx --no-create-home nginx \
 && rm -f /etc/nginx/sites-enabled/default
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
