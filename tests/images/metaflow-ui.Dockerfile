# Test equivalent of public.ecr.aws/outerbounds/metaflow_ui:v1.3.14 (cannot be
# pulled on the test machines): the upstream build (../shared/vendor, built
# with the project's own `npm run build`) served by nginx with the upstream
# template, which is rendered from the environment at start as the official
# (nginx) image does: only variables that are set are substituted. bash for
# the stack's healthcheck (the official image has neither curl nor wget).
ARG BASE=mfs-base:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends nginx gettext-base >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /etc/nginx/sites-enabled/default \
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
COPY metaflow-ui-1.3.14-build.tar.gz /tmp/
RUN tar -xzf /tmp/metaflow-ui-1.3.14-build.tar.gz -C /tmp \
 && rm -rf /usr/share/nginx/html && mkdir -p /usr/share/nginx /etc/nginx/templates \
 && mv /tmp/metaflow-ui-1.3.14/build /usr/share/nginx/html \
 && mv /tmp/metaflow-ui-1.3.14/nginx.conf.template /etc/nginx/templates/default.conf.template \
 && rm -rf /tmp/metaflow-ui-1.3.14*
# The official image's defaults.
ENV PORT=3000 METAFLOW_SERVICE=/api METAFLOW_HEAD='' METAFLOW_BODY_BEFORE='' \
    METAFLOW_BODY_AFTER='' MF_DEFAULT_TIME_FILTER_DAYS=''
COPY metaflow-ui.start.sh /usr/local/bin/metaflow-ui-start
RUN chmod 0755 /usr/local/bin/metaflow-ui-start
STOPSIGNAL SIGQUIT
CMD ["/usr/local/bin/metaflow-ui-start"]
