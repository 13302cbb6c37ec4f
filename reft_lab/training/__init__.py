"""Training: the ``trainer`` config, the loop, its loss and data order, and the speed-ups that swap
the model's forwards while it trains. ``reft_lab.recipe`` runs a whole job around it."""

from reft_lab.training.config import TrainerConfig
from reft_lab.training.loop import Diverged, Interrupted, TrainStats, build_optimizer, seed_everything, train
from reft_lab.training.loss import response_loss
from reft_lab.training.stream import BatchStream

__all__ = ["BatchStream", "Diverged", "Interrupted", "TrainStats", "TrainerConfig", "build_optimizer", "response_loss",
           "seed_everything", "train"]
