"""`imgsim://R-50.pkl`: the self-supervised ResNet-50 of the `imgsim` wheel as backbone weights.

No ImageNet checkpoint can be downloaded on this platform; the `imgsim` 0.1.2 wheel ships
`imgsim/model.pth`, a torchvision-layout ResNet-50 trained without labels on ImageNet images
(RGB input, torchvision mean/std, as configs/Base-SparseDETR.yaml). On first use the path is
converted into a Detectron2-format `.pkl` (trunk renamed by `sparse_detr.checkpoint.resnet_names`,
the 2048->768 head dropped) cached under iopath's cache directory; `DetectionCheckpointer` loads
it with its name-matching heuristics, so `MODEL.WEIGHTS imgsim://R-50.pkl` fills
`backbone.*` whatever the wrapper's prefix. The wheel's code is never imported.
"""
import importlib.util
import os
import pickle

import torch
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler, get_cache_dir

from ..checkpoint.resnet_names import convert_torchvision_resnet_state_dict

__all__ = ["ImgsimHandler", "convert_imgsim_resnet50"]


def convert_imgsim_resnet50(output_path: str) -> str:
    """Write imgsim's ResNet-50 trunk to `output_path` as a Detectron2 model-zoo `.pkl`."""
    spec = importlib.util.find_spec("imgsim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the imgsim wheel is not installed; run tools/setup.sh")
    source = os.path.join(list(spec.submodule_search_locations)[0], "model.pth")
    state = torch.load(source, map_location="cpu", weights_only=True)
    trunk = convert_torchvision_resnet_state_dict(state, strip_prefix="module.pre.")
    data = {
        "model": {k: v.numpy() for k, v in trunk.items()},
        "__author__": "imgsim 0.1.2 (self-supervised ResNet-50, torchvision layout)",
        "matching_heuristics": True,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path + ".tmp", "wb") as f:
        pickle.dump(data, f)
    os.replace(output_path + ".tmp", output_path)
    return output_path


class ImgsimHandler(PathHandler):
    """Resolves `imgsim://R-50.pkl` to the converted checkpoint (converting it once)."""

    PREFIX = "imgsim://"
    NAMES = ("R-50.pkl",)

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        name = path[len(self.PREFIX):]
        if name not in self.NAMES:
            raise ValueError(f"{path}: imgsim provides {[self.PREFIX + n for n in self.NAMES]}")
        local = os.path.join(get_cache_dir(), "sparse_detr", "imgsim_" + name)
        if not os.path.isfile(local):
            convert_imgsim_resnet50(local)
        return local

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(ImgsimHandler())
