"""Builders of the commands the deploy runs on the VM: every shell line a
step or command runs comes from here.

Each function returns the shell text of one remote command and never
connects; deploy/remote.py runs them, as root (directly or through sudo).
Unit tests pin them as exact strings (tests/test_deploy_commands.py). Every
command is safe to run again: it checks before it acts and says what it did
("exists, skipped"). By subject:

    machine.py     preflight facts, Docker installed and started, the lock
    files.py       files written when they change, secrets, certificate, folders
    containers.py  compose, images, containers, the stack's own commands
"""

from .containers import *  # noqa: F401,F403
from .files import *  # noqa: F401,F403
from .machine import *  # noqa: F401,F403
from .machine import q  # noqa: F401
