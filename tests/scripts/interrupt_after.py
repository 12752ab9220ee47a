"""Run a script as __main__, but stop it (exit status 3) right after its N-th ``os.replace`` call.

    python tests/scripts/interrupt_after.py N script.py [script args...]

Used by tests/test_examples.py to interrupt an example's training loop after a given checkpoint (the examples
commit each checkpoint with one ``os.replace``), as a crash would, so that its --resume can be compared with an
uninterrupted run.
"""

import os
import runpy
import sys

saves = int(sys.argv[1])
script = sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
original = os.replace


def save_then_maybe_stop(*args, **kwargs):
    global saves
    original(*args, **kwargs)
    saves -= 1
    if saves == 0:
        print("interrupted", flush=True)
        raise SystemExit(3)


os.replace = save_then_maybe_stop
runpy.run_path(script, run_name="__main__")
