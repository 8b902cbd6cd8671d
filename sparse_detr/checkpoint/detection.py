"""`SparseDETRCheckpointer`: Detectron2's DetectionCheckpointer with clear errors for unusable checkpoints."""
from typing import List, Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer

from .official import OFFICIAL_BACKBONE_PREFIX

__all__ = ["CheckpointError", "SparseDETRCheckpointer"]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into the model; the message names the file."""


def _some(names: Sequence, count: int = 3) -> str:
    return f"{len(names)} {list(names)[:count]}{' ...' if len(names) > count else ''}"


class SparseDETRCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that raises `CheckpointError`, naming the file, where the stock one fails
    cryptically or loads silently:

    * an unreadable file (truncated by an interrupted copy or save, or not a checkpoint at all), instead
      of torch's zip / pickle error;
    * an official Sparse DETR checkpoint (`backbone.0.body.*` names): it must be converted first;
    * a checkpoint none of whose tensors fits the model (another architecture), instead of warnings and
      a randomly initialised model;
    * when resuming (`load` with every checkpointable, as `resume_or_load(resume=True)` does with a last
      checkpoint), any missing, unexpected or mis-shaped tensor: the output folder holds another model's run.

    Initial weights (MODEL.WEIGHTS, `load(path, checkpointables=[])`) may still match in part, e.g.
    backbone-only weights or another NUM_CLASSES, with Detectron2's warnings.
    """

    _loading = (None, False)  # (path, resuming) during `load`

    def load(self, path: str, checkpointables: Optional[List[str]] = None):
        self._loading = (path, checkpointables is None and bool(self.checkpointables))
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading = (None, False)

    def _load_file(self, filename: str):
        try:
            return super()._load_file(filename)
        except Exception as e:  # torch's zip reader, the unpickler or Detectron2's format checks
            raise CheckpointError(
                f"cannot read the checkpoint {filename}: {type(e).__name__}: {e}. The file is truncated (an "
                f"interrupted save or copy) or is not a PyTorch / Detectron2 checkpoint.") from e

    def _load_model(self, checkpoint):
        path, resuming = self._loading
        names = list(checkpoint["model"])
        if any(k.startswith((OFFICIAL_BACKBONE_PREFIX, "module." + OFFICIAL_BACKBONE_PREFIX)) for k in names):
            raise CheckpointError(
                f"{path} is an official Sparse DETR checkpoint; convert it first: python "
                f"projects/SparseDETR/convert_official_checkpoint.py --source {path} --output converted.pth")
        parameters = {name for name, _ in self.model.named_parameters()}  # (FrozenBN fills absent buffers)
        incompatible = super()._load_model(checkpoint)
        if not parameters - set(incompatible.missing_keys):
            raise CheckpointError(
                f"none of the {len(names)} tensors of {path} fits this {type(self.model).__name__} (a checkpoint "
                f"of another model? names: {_some(names)})")
        if resuming and (incompatible.missing_keys or incompatible.unexpected_keys or incompatible.incorrect_shapes):
            raise CheckpointError(
                f"cannot resume from {path}: it is not a checkpoint of this model (missing "
                f"{_some(incompatible.missing_keys)}, unexpected {_some(incompatible.unexpected_keys)}, shape "
                f"mismatches {_some([k for k, *_ in incompatible.incorrect_shapes])}). Resume with the config "
                f"that wrote it, or use another OUTPUT_DIR or no --resume.")
        return incompatible
