#!/bin/bash
# Renders /etc/nginx/templates/*.template into /etc/nginx/conf.d (what the
# official nginx image's entrypoint does): only variables set in the
# environment are replaced, so nginx's own $variables survive.
set -euo pipefail
vars=$(env | cut -d= -f1 | sed 's/^/${/; s/$/}/' | tr '\n' ' ')
for t in /etc/nginx/templates/*.template; do
  envsubst "$vars" < "$t" > "/etc/nginx/conf.d/$(basename "$t" .template)"
done
exec nginx -g 'daemon off;'
