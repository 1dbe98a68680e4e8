"""``python -m fusedsae …`` (and ``torchrun --nproc-per-node N -m fusedsae train …``)."""

import sys

from fusedsae.cli import main

sys.exit(main())
