"""The training core: one loop for everything that learns (weights, patches, triggers).

- :mod:`.optim`: named optimisers with parameter groups (no decay on gains, biases and the
  temperature) and warm-up + cosine schedules;
- :mod:`.batches`: batch sources that know their length, start mid-epoch and shard by rank;
- :mod:`.loop`: ``train(step, batches, optimizers, ...)`` with accumulation, autocast,
  clipping, per-stage checkpoint slots and mid-epoch resume;
- :mod:`.pgd`: projected gradient descent with the loss as an argument;
- :mod:`.stopping`: early stopping when a per-epoch number plateaus;
- :mod:`.contrastive`: captions as ids and the shared contrastive (CLIP) step.
"""

from .batches import Batches, BatchSource, IndexBatches, stream_seed
from .contrastive import CaptionTable, contrastive_loss
from .loop import StepContext, TrainResult, train
from .optim import Optim, build_optimizer, lr_factor, no_decay, param_groups, seed_everything
from .pgd import pgd
from .stopping import Plateau

__all__ = [
    "BatchSource", "Batches", "CaptionTable", "IndexBatches", "Optim", "Plateau", "StepContext",
    "TrainResult", "build_optimizer", "contrastive_loss", "lr_factor", "no_decay",
    "param_groups", "pgd", "seed_everything", "stream_seed", "train",
]
