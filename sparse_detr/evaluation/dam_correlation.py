"""`DAMCorrelationEvaluator`: the paper's DAM correlation of the selected tokens, averaged over a dataset."""
import itertools
import logging
from collections import defaultdict
from typing import Dict, List

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["DAMCorrelationEvaluator"]

logger = logging.getLogger(__name__)


class DAMCorrelationEvaluator(DatasetEvaluator):
    """Share of the decoder cross-attention mass that falls on the encoder's selected tokens.

    Reads the "dam_correlation" entry that `SparseDETR` adds to every image's output when
    `MODEL.SPARSE_DETR.TEST_DAM_CORRELATION` is set (and the inference rho is > 0): per image, overall
    ("corr_mask_attn_map_dec_all") and per feature level ("corr_mask_attn_map_dec_{l}"), the official
    names. `evaluate()` returns {"dam_correlation": {name: mean over the images of all processes}}, so
    the trainer prints it and writes it to the event storage (metrics.json, TensorBoard) as
    "dam_correlation/<name>". Values are fractions in [0, 1].

        DatasetEvaluators([COCOEvaluator(name), DAMCorrelationEvaluator()])
    """

    KEY = "dam_correlation"

    def reset(self):
        self._values: List[Dict[str, float]] = []

    def process(self, inputs, outputs):
        self._values.extend(out[self.KEY] for out in outputs if self.KEY in out)

    def evaluate(self):
        values = list(itertools.chain(*comm.gather(self._values, dst=0)))
        if not comm.is_main_process():
            return {}
        if not values:
            logger.warning("DAMCorrelationEvaluator got no 'dam_correlation' outputs: set "
                           "MODEL.SPARSE_DETR.TEST_DAM_CORRELATION True (needs an inference rho > 0)")
            return {}
        per_name = defaultdict(list)
        for value in values:
            for name, v in value.items():
                per_name[name].append(v)
        return {self.KEY: {name: float(np.mean(v)) for name, v in per_name.items()}}
