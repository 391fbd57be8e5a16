"""Holds a sqlite3 database inside BEGIN EXCLUSIVE across a checkpoint or a migration.

Usage: sqlite_exclusive.py DB LOG GO. Inserts a row inside the transaction and logs
`ready`; once the file GO exists, commits and logs `PASS`, or `FAIL: <error>` (a copy
that lost the database's locks: `disk I/O error`)."""

import os
import sqlite3
import sys
import time

db, log, go = sys.argv[1:4]


def say(line):
    with open(log, "a") as f:
        f.write(line + "\n")


c = sqlite3.connect(db, isolation_level=None, timeout=0)
c.execute("BEGIN EXCLUSIVE")
c.execute("INSERT INTO t VALUES ('inside')")
say("ready")
while not os.path.exists(go):
    time.sleep(0.01)  # the workload's own pace, not the test's synchronisation
try:
    c.execute("COMMIT")
    say("PASS")
except sqlite3.Error as e:
    say("FAIL: %s" % e)
