"""LoRA training: TARA concept LoRAs (token-masked k/v plus key alignment), DreamBooth style."""

from .tara import TaraTrainingOptions, TaraTrainingResult, train_tara

__all__ = ["TaraTrainingOptions", "TaraTrainingResult", "train_tara"]
