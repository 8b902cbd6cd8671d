"""Training in 2 processes through Detectron2's `launch` on CPU (gloo), checked against one process.

Each rank trains on its own image (2 synthetic 96x64 images, 1 per rank; deterministic mapper, no
dropout; each process seeds its weights differently, DDP broadcasts rank 0's). DDP averages the
gradients, so both ranks must hold identical weights after every step, and the run must equal one
process training on both images per batch: the mean of the ranks' losses is the one-process loss
(num_boxes is all-reduced), and the weights after two steps agree. SGD (no AdamW sign-like first
step that would amplify float noise on near-zero gradients) with full-model gradient clipping.
"""
import os

import torch
from detectron2.config import get_cfg
from detectron2.engine import launch
from detectron2.utils import comm

import sparse_detr.data  # noqa: F401
from sparse_detr import add_sparse_detr_config
from sparse_detr.engine import Trainer
from synthetic import register_synthetic, tiny_opts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ITER = 2


def _train(data_dir: str, output_dir: str, result_path: str):
    """Train NUM_ITER iterations of 2 images in total; save this rank's losses and final weights."""
    register_synthetic("synthetic_pair", data_dir)
    cfg = add_sparse_detr_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-SparseDETR.yaml"))
    cfg.merge_from_list(tiny_opts("synthetic_pair", "synthetic_pair", output_dir, NUM_ITER, [
        "INPUT.DATASET_MAPPER", "default", "INPUT.RANDOM_FLIP", "none", "INPUT.MIN_SIZE_TRAIN", "(64,)",
        "MODEL.SPARSE_DETR.DROPOUT", "0.0", "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()",
    ]))
    cfg.freeze()
    torch.manual_seed(comm.get_rank())  # different initial weights per rank: DDP must broadcast rank 0's
    trainer = Trainer(cfg)
    model = getattr(trainer.model, "module", trainer.model)
    losses = []
    model.register_forward_hook(lambda m, inputs, out: losses.append(sum(out.values()).item()) if m.training else None)
    trainer.train()
    torch.save({"losses": losses, "weights": {k: v.clone() for k, v in model.state_dict().items()}},
               f"{result_path}.rank{comm.get_rank()}")


def test_two_process_cpu_training_matches_one_process(tmp_path):
    data_dir = str(tmp_path / "data")
    from synthetic import write_synthetic_coco

    write_synthetic_coco(data_dir, num_images=2)
    launch(_train, 2, dist_url="auto", args=(data_dir, str(tmp_path / "ddp"), str(tmp_path / "ddp")))
    launch(_train, 1, args=(data_dir, str(tmp_path / "one"), str(tmp_path / "one")))
    rank0, rank1 = (torch.load(tmp_path / f"ddp.rank{r}") for r in (0, 1))
    single = torch.load(tmp_path / "one.rank0")

    assert len(rank0["losses"]) == len(single["losses"]) == NUM_ITER
    for it in range(NUM_ITER):
        mean_loss = (rank0["losses"][it] + rank1["losses"][it]) / 2
        assert abs(mean_loss - single["losses"][it]) < 1e-4 * abs(single["losses"][it]), it
    assert rank0["losses"][0] != rank1["losses"][0]  # the ranks did see different images
    for name, w0 in rank0["weights"].items():
        torch.testing.assert_close(rank1["weights"][name], w0, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(single["weights"][name], w0, rtol=1e-4, atol=1e-6, msg=name)
