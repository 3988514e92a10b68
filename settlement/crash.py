"""Injectable crash points for failure tests of the settler.

``OPENLEDGER_SETTLER_CRASH_AT=<step>`` makes the process exit with status 137 (as a
SIGKILL would) when it reaches ``crash_point(<step>)``. Steps, in order:

- ``before_broadcast``: the signed transaction is committed to PostgreSQL, not sent;
- ``after_broadcast``: the node accepted it, the state change is not recorded;
- ``after_mined``: a receipt was recorded, confirmations are not reached;
- ``after_confirmed``: confirmed on chain, the ledger's closing commit not done.

Unset (production), ``crash_point`` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import sys

CRASH_ENV = "OPENLEDGER_SETTLER_CRASH_AT"
CRASH_STEPS = ("before_broadcast", "after_broadcast", "after_mined", "after_confirmed")
CRASH_EXIT_STATUS = 137


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        sys.stderr.write(f"crash point {step}: exiting with {CRASH_EXIT_STATUS}\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT_STATUS)
