"""Checkpoints: loading with clear errors, conversion of official Sparse DETR checkpoints and torchvision ResNet
weights."""
from .detection import CheckpointError, SparseDETRCheckpointer
from .official import OfficialCheckpointError, convert_official_checkpoint
from .resnet_names import convert_torchvision_resnet_state_dict, torchvision_to_detectron2_resnet_name

__all__ = ["CheckpointError", "SparseDETRCheckpointer", "OfficialCheckpointError", "convert_official_checkpoint",
           "convert_torchvision_resnet_state_dict", "torchvision_to_detectron2_resnet_name"]
