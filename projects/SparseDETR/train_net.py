#!/usr/bin/env python
"""Train and evaluate Sparse DETR with Detectron2 (the stock `tools/train_net.py` pattern).

    python projects/SparseDETR/train_net.py --config-file configs/COCO-Detection/sparse_detr_R_50_rho_0.1.yaml --num-gpus 8
    python projects/SparseDETR/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python projects/SparseDETR/train_net.py --config-file ... --resume
    python projects/SparseDETR/train_net.py --config-file ... MODEL.DEVICE cpu
"""
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import sparse_detr  # noqa: F401  (registers the SparseDETR meta-architecture)
import sparse_detr.data  # noqa: F401  (registers the project's datasets)
from sparse_detr import add_sparse_detr_config
from sparse_detr.checkpoint import SparseDETRCheckpointer
from sparse_detr.engine import Trainer


def setup(args):
    """Config from Detectron2's defaults + Sparse DETR keys + the file + command-line overrides."""
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # the project's own messages (e.g. the TTA evaluation, AdaBN) in the console and OUTPUT_DIR/log.txt
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sparse_detr")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        SparseDETRCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
