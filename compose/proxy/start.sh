#!/bin/sh
# Renders the proxy's nginx configuration from the templates next to it and
# the environment (upstreams, the Metaflow UI's basic-auth credentials, the
# metadata API key), then runs nginx in the foreground. The secrets reach the
# configuration only inside the container, under /tmp.
set -eu

out=/tmp/mfs-proxy
rm -rf "$out"
mkdir -p "$out/sites"
for d in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$out/temp/$d"; done
chown -R nginx "$out/temp"

basic=""
if [ -n "${MFS_PROXY_METAFLOW_UI_PASSWORD:-}" ]; then
  basic=$(printf '%s:%s' "${MFS_PROXY_METAFLOW_UI_USER:-metaflow}" "$MFS_PROXY_METAFLOW_UI_PASSWORD" \
          | base64 | tr -d '\n')
fi

render() {
  # Secrets are generated from [A-Za-z0-9], safe in sed and nginx strings.
  sed -e "s|@@S3_UPSTREAM@@|${MFS_PROXY_S3_UPSTREAM:?}|g" \
      -e "s|@@METAFLOW_UI_BASIC@@|$basic|g" \
      -e "s|@@METAFLOW_API_KEY@@|${MFS_PROXY_METAFLOW_API_KEY:-}|g" \
      "$1" > "$2"
}

render /etc/mfs-proxy/nginx.conf.template "$out/nginx.conf"
for t in /etc/mfs-proxy/sites/*.conf.template; do
  [ -e "$t" ] || continue
  if [ -z "$basic" ] || [ -z "${MFS_PROXY_METAFLOW_API_KEY:-}" ]; then
    echo "proxy: $t needs MFS_PROXY_METAFLOW_UI_PASSWORD and MFS_PROXY_METAFLOW_API_KEY" >&2
    exit 1
  fi
  name=$(basename "$t" .template)
  render "$t" "$out/sites/$name"
done
chmod -R go-rwx "$out/nginx.conf" "$out/sites"

nginx -t -q -c "$out/nginx.conf"
exec nginx -c "$out/nginx.conf" -g 'daemon off;'
