"""Write an export of a small torch module and SIGKILL this process at one stage of it, as a crash would.

    python tests/scripts/export_killed.py TARGET STAGE VALUE [--overwrite] [--no-exchange]

VALUE fills the module's weights (so the old and the new export differ). STAGE is where the kill happens:
``none`` (write the export and exit 0), ``writing`` (the weights are written, the model card not yet),
``before-commit`` (everything written, nothing moved), ``after-exchange`` (the new export swapped in, the old
one not yet deleted), ``moved-aside`` (without exchange: the old export moved aside, the new one not yet in
place), ``after-move`` (the new export in place, the old one not yet deleted). ``--no-exchange`` makes the
exchange rename report itself unsupported, as on a filesystem without it.
"""

import os
import signal
import sys

import torch

import compressx
from compressx import atomic
from compressx import export as export_mod

target, stage, value = sys.argv[1], sys.argv[2], float(sys.argv[3])


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


real_card, real_exchange, real_noreplace = export_mod._model_card, atomic.exchange, atomic.rename_noreplace


def card(manifest):
    if stage == "writing":
        kill()
    return real_card(manifest)


def exchange(a, b):
    if stage == "before-commit":
        kill()
    if "--no-exchange" in sys.argv:
        return False
    done = real_exchange(a, b)
    if stage == "after-exchange":
        kill()
    return done


def noreplace(src, dst):
    if stage == "moved-aside" or (stage == "before-commit" and "--overwrite" not in sys.argv):
        kill()
    real_noreplace(src, dst)
    if stage == "after-move":
        kill()


export_mod._model_card = card
export_mod.exchange = exchange
export_mod.rename_noreplace = noreplace

model = torch.nn.Linear(8, 8)
with torch.no_grad():
    model.weight.fill_(value)
    model.bias.fill_(value)
compressx.save(model, target, overwrite="--overwrite" in sys.argv)
