from .config import TrainConfig
from .loop import NonFiniteLoss, TrainResult, train

__all__ = ["NonFiniteLoss", "TrainConfig", "TrainResult", "train"]
