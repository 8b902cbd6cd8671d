"""Dataset mappers of Sparse DETR, chosen by INPUT.DATASET_MAPPER ("detr" or "default")."""
from detectron2.data import DatasetMapper

from .transforms import build_detr_train_augmentation

__all__ = ["DetrDatasetMapper", "build_dataset_mapper"]


class DetrDatasetMapper(DatasetMapper):
    """Detectron2's `DatasetMapper` with the official DETR training augmentation.

    Reading (any PIL mode is converted to INPUT.FORMAT, e.g. grayscale/RGBA -> RGB), crowd removal,
    box transformation and clipping, and the removal of empty boxes are Detectron2's. The output
    `instances.gt_boxes` are absolute XYXY boxes in the augmented image, whose (H, W) is the
    `image` tensor's shape; the model normalises them with `ImageList.image_sizes`. At test time
    the image is resized by INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST, as the official 800/1333.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train:
            ret["augmentations"] = build_detr_train_augmentation(cfg)
        return ret


_MAPPERS = {"detr": DetrDatasetMapper, "default": DatasetMapper}


def build_dataset_mapper(cfg, is_train: bool):
    """The mapper named by cfg.INPUT.DATASET_MAPPER."""
    name = cfg.INPUT.DATASET_MAPPER
    if name not in _MAPPERS:
        raise ValueError(f"INPUT.DATASET_MAPPER must be one of {sorted(_MAPPERS)}, got {name!r}")
    return _MAPPERS[name](cfg, is_train)
