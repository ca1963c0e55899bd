"""Training: token shards -> HF-format model dir (AdamW, warmup+cosine, DDP, atomic checkpoints).

from fastserve.train import TrainConfig, train
result = train(TrainConfig(data_dir="data/", out_dir="runs/a", model="tiny"))
"""

from fastserve.train.config import TrainConfig
from fastserve.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
