"""fusedsae: fast sparse autoencoders.

The layer (:class:`SparseAutoencoder`, :class:`SAEConfig`) keeps SAELens's weights, maths and files; the stateless
ops live in :mod:`fusedsae.functional`; :class:`Trainer` trains on any data source (toy data in
:mod:`fusedsae.toy`). Ops run on the fastest usable backend (:mod:`fusedsae.backends`, ``FUSEDSAE_BACKEND``).
"""

from fusedsae import analysis, backends, functional, metrics, ops, reference, toy
from fusedsae._version import __version__
from fusedsae.checkpoint import CheckpointError, RunFolderError
from fusedsae.config import SAEConfig
from fusedsae.data import DataError, DataSource, IterableSource, TensorSource, ToySource
from fusedsae.formats import SAEFormatError, load_sae
from fusedsae.sae import SparseAutoencoder, TrainingOutput
from fusedsae.training import TrainConfig, Trainer, TrainingDiverged

load = load_sae

__all__ = [
    "CheckpointError",
    "DataError",
    "DataSource",
    "IterableSource",
    "RunFolderError",
    "SAEConfig",
    "SAEFormatError",
    "SparseAutoencoder",
    "TensorSource",
    "ToySource",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingOutput",
    "__version__",
    "analysis",
    "backends",
    "functional",
    "load",
    "metrics",
    "ops",
    "reference",
    "toy",
]
