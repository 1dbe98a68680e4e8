"""``python -m fusedsae …`` (and ``torchrun --nproc-per-node N -m fusedsae train …``: each worker records its own
error for the agent to print, see :mod:`fusedsae.elastic`)."""

import sys

from fusedsae.cli import main
from fusedsae.elastic import record_errors

entry = record_errors(main)

if __name__ == "__main__":
    sys.exit(entry())
