#!/opt/latest/bin/python3
"""A stand-in for pressly/goose v3.9.0's `up` (the Go binary cannot be
obtained on the test machines), enough for run_goose.py:

    goose -dir DIR postgres DSN up

What goose does and this does too: the table goose_db_version (id, version_id,
is_applied, tstamp) with version 0 as its first row; migration files
VERSION_name.sql applied in version order, each once; the SQL between
`-- +goose Up` and `-- +goose Down`, split into statements at lines ending in
`;` (except inside StatementBegin/StatementEnd); one transaction per file
with its version row, or, for a file marked `-- +goose NO TRANSACTION`, each
statement on its own (CREATE INDEX CONCURRENTLY cannot run in a transaction).
A pending migration older than the newest applied one is an error, as in
goose without -allow-missing.
"""

import os
import re
import sys

import psycopg2

TABLE = """CREATE TABLE IF NOT EXISTS goose_db_version (
    id serial NOT NULL, version_id bigint NOT NULL, is_applied boolean NOT NULL,
    tstamp timestamp NULL default now(), PRIMARY KEY(id))"""


def parse(path):
    """(statements of the Up section, whether it runs in a transaction)."""
    statements, buf, section, in_block, tx = [], [], None, False, True
    for line in open(path, encoding="utf-8"):
        mark = line.strip()
        if mark.startswith("-- +goose"):
            word = mark[len("-- +goose"):].strip().upper()
            if word == "UP":
                section = "up"
            elif word == "DOWN":
                section = "down"
            elif word == "NO TRANSACTION":
                tx = False
            elif word == "STATEMENTBEGIN":
                in_block = True
            elif word == "STATEMENTEND" and section == "up":
                in_block = False
                statements.append("".join(buf))
                buf = []
            continue
        if section != "up":
            continue
        buf.append(line)
        if not in_block and mark.endswith(";"):
            statements.append("".join(buf))
            buf = []
    if "".join(buf).strip():
        statements.append("".join(buf))
    real = [s for s in statements
            if any(l.strip() and not l.strip().startswith("--") for l in s.splitlines())]
    return real, tx


def migrations(folder):
    found = []
    for name in os.listdir(folder):
        m = re.match(r"^(\d+)_.*\.sql$", name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def up(folder, dsn):
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SELECT to_regclass('goose_db_version') IS NOT NULL")
    if not cur.fetchone()[0]:
        cur.execute(TABLE)
        cur.execute("INSERT INTO goose_db_version (version_id, is_applied) VALUES (0, true)")
    cur.execute("SELECT version_id FROM goose_db_version WHERE is_applied")
    applied = {row[0] for row in cur.fetchall()}
    newest = max(applied)
    pending = [(v, p) for v, p in migrations(folder) if v not in applied]
    missing = [v for v, _ in pending if v < newest]
    if missing:
        sys.exit("goose: error: found %d missing migrations before current version %d: %s"
                 % (len(missing), newest, missing))
    for version, path in pending:
        statements, tx = parse(path)
        if tx:
            conn.autocommit = False
            with conn:
                with conn.cursor() as c:
                    for s in statements:
                        c.execute(s)
                    c.execute("INSERT INTO goose_db_version (version_id, is_applied) "
                              "VALUES (%s, true)", (version,))
            conn.autocommit = True
        else:
            for s in statements:
                cur.execute(s)
            cur.execute("INSERT INTO goose_db_version (version_id, is_applied) VALUES (%s, true)",
                        (version,))
        print("OK   %s" % os.path.basename(path), flush=True)
    cur.execute("SELECT max(version_id) FROM goose_db_version WHERE is_applied")
    print("goose: no migrations to run. current version: %d" % cur.fetchone()[0]
          if not pending else "goose: successfully migrated database to version: %d"
          % cur.fetchone()[0], flush=True)


def main(argv):
    args = list(argv)
    folder = "."
    if "-dir" in args:
        i = args.index("-dir")
        folder = args[i + 1]
        del args[i:i + 2]
    if len(args) != 3 or args[0] != "postgres" or args[2] != "up":
        sys.exit("usage: goose -dir DIR postgres DSN up (this stand-in supports only `up`)")
    up(folder, args[1])


if __name__ == "__main__":
    main(sys.argv[1:])
