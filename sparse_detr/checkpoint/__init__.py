"""Checkpoint conversion: official Sparse DETR checkpoints and torchvision ResNet weights -> this project."""
from .official import OfficialCheckpointError, convert_official_checkpoint
from .resnet_names import convert_torchvision_resnet_state_dict, torchvision_to_detectron2_resnet_name

__all__ = ["OfficialCheckpointError", "convert_official_checkpoint", "convert_torchvision_resnet_state_dict",
           "torchvision_to_detectron2_resnet_name"]
