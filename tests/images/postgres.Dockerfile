# Test equivalent of the official postgres:17 image (cannot be pulled on the
# test machines): PostgreSQL 17 from Debian 13 with the same contract, i.e. an
# entrypoint that initialises PGDATA on first start with POSTGRES_PASSWORD
# (scram for TCP, trust on the local socket) and runs `postgres` as the
# postgres user; pg_isready and psql on PATH; SIGINT stops it (fast shutdown).
ARG BASE=mfs-base:trixie
FROM ${BASE}
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends postgresql-17 >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 # Debian creates a default cluster at install time; the image starts empty.
 && pg_dropcluster 17 main \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 2775 /var/run/postgresql
COPY postgres.entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/17/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
