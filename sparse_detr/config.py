"""Config keys of Sparse DETR: `add_sparse_detr_config(cfg)` adds them to a Detectron2 CfgNode.

Every flag of the official implementation has a key under `MODEL.SPARSE_DETR`; the official
training recipe (AdamW, parameter-group multipliers, full-model gradient clipping) lives under
`SOLVER`. Defaults reproduce the official Sparse DETR rho=0.1 configuration (R-50, two-stage,
box refinement, eff query init, eff specific head, encoder auxiliary loss).
"""
from detectron2.config import CfgNode as CN

# ImageNet statistics in 0..255 RGB (torchvision's normalisation, as in the official code).
TORCHVISION_PIXEL_MEAN = [123.675, 116.280, 103.530]
TORCHVISION_PIXEL_STD = [58.395, 57.120, 57.375]


def add_sparse_detr_config(cfg):
    """Add the Sparse DETR keys to `cfg` in place (idempotent) and return it."""
    if "SPARSE_DETR" in cfg.MODEL:
        return cfg
    cfg.MODEL.SPARSE_DETR = sd = CN()
    sd.NUM_CLASSES = 80
    # Keep ratio of encoder tokens. 0.0 is the dense Deformable DETR encoder (no scoring network).
    sd.RHO = 0.1
    # Keep ratio at inference; negative means "same as RHO" (the paper's dynamic sparsification).
    sd.TEST_RHO = -1.0
    # Token selection criterion: "dam" (scoring network trained on the decoder cross-attention
    # map) or "objectness" (auxiliary objectness head trained with the detection targets).
    sd.SELECTION = "dam"
    # At inference, also add each image's DAM correlation (share of the decoder cross-attention mass on
    # the selected tokens, overall and per level) to its output dict, for
    # sparse_detr.evaluation.DAMCorrelationEvaluator. Costs one DAM splat per batch.
    sd.TEST_DAM_CORRELATION = False
    # DAM splatting convention: "official" (location*size, the official half-pixel shift) or
    # "exact" (location*size - 0.5, where the attention op really samples).
    sd.DAM_CONVENTION = "official"
    sd.USE_ENC_AUX_LOSS = True
    # The encoder auxiliary heads' sets matched to the ground truth repeated this many times (not in the
    # paper; 1, the default, is the official one-to-one matching): each object supervises up to that many
    # selected tokens in every encoder layer, a denser signal for short schedules. Training only.
    sd.ENC_AUX_REPEATS = 1
    sd.TWO_STAGE = True
    sd.WITH_BOX_REFINE = True
    sd.EFF_QUERY_INIT = True
    sd.EFF_SPECIFIC_HEAD = True
    sd.AUX_LOSS = True
    # Look forward twice (DINO; not in the paper, off by default): with box refinement, a decoder layer's
    # box loss also reaches the previous layer's refinement head (its reference box keeps the gradient);
    # the attention of each layer still samples around the detached box, as in the official code.
    sd.LOOK_FORWARD_TWICE = False
    sd.NUM_QUERIES = 300
    sd.NUM_FEATURE_LEVELS = 4
    sd.IN_FEATURES = ["res3", "res4", "res5"]
    sd.HIDDEN_DIM = 256
    sd.NHEADS = 8
    sd.DIM_FEEDFORWARD = 1024
    sd.DROPOUT = 0.1
    sd.ENC_LAYERS = 6
    sd.DEC_LAYERS = 6
    sd.ENC_N_POINTS = 4
    sd.DEC_N_POINTS = 4
    # Loss weights.
    sd.CLS_LOSS_COEF = 2.0
    sd.BBOX_LOSS_COEF = 5.0
    sd.GIOU_LOSS_COEF = 2.0
    sd.MASK_PREDICTION_COEF = 1.0
    sd.FOCAL_ALPHA = 0.25
    # Classification loss: "focal" (official: sigmoid focal loss, 0/1 targets) or "varifocal" (not in the
    # paper: a matched query's score is trained towards its box's IoU with the ground truth, so scores rank
    # boxes by localisation quality and the two-stage top-k picks well-placed proposals; VarifocalNet's
    # alpha 0.75, gamma 2; RT-DETR's classification weight for it is 1.0, see CLS_LOSS_COEF).
    sd.CLASS_LOSS = "focal"
    # Hungarian matcher costs.
    sd.SET_COST_CLASS = 2.0
    sd.SET_COST_BBOX = 5.0
    sd.SET_COST_GIOU = 2.0
    # One-to-many training queries (hybrid matching; not in the paper, off by default; see
    # sparse_detr/modeling/one_to_many.py): this many extra two-stage queries in training, matched to the
    # ground truth repeated ONE_TO_MANY_REPEATS times, their losses weighted by ONE_TO_MANY_LOSS_WEIGHT.
    # Inference is unchanged (NUM_QUERIES queries).
    sd.ONE_TO_MANY_QUERIES = 0
    sd.ONE_TO_MANY_REPEATS = 6
    sd.ONE_TO_MANY_LOSS_WEIGHT = 1.0
    # Denoising training queries (DN-DETR; not in the paper, off by default; see
    # sparse_detr/modeling/denoising.py): this many groups of ground-truth boxes jittered by up to
    # DN_BOX_NOISE_SCALE of their size, labels replaced by a random class with probability
    # DN_LABEL_NOISE_RATIO, each query supervised by its own object. Training only; DN-DETR's defaults.
    sd.DN_GROUPS = 0
    sd.DN_BOX_NOISE_SCALE = 0.4
    sd.DN_LABEL_NOISE_RATIO = 0.2
    # Run the encoder auxiliary heads at inference too (the official code does; costs FLOPs).
    sd.ENC_AUX_HEADS_AT_INFERENCE = False
    # Run the model's float32 linear layers through oneDNN in CPU inference (sparse_detr.layers.onednn_linear:
    # about 2x faster than PyTorch's MKL path on AMD CPUs; same parameters; training is unaffected).
    sd.CPU_ONEDNN_LINEAR = True
    # Run the backbone's ResNet stages on oneDNN tensors (batch norms folded, weights reordered once) in CPU
    # float32 wherever no gradient flows through them: the frozen stages in training, all in inference
    # (sparse_detr.layers.onednn_stages; same parameters, same outputs to float rounding).
    sd.CPU_ONEDNN_STAGES = True

    # Swin-T backbone (build_sparse_detr_swin_backbone).
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.2
    cfg.MODEL.SWIN.OUT_FEATURES = ["p1", "p2", "p3"]
    cfg.MODEL.SWIN.FROZEN_STAGES = 2

    # Dataset mapper used by the trainer: "detr" (official augmentation) or "default"
    # (Detectron2's DatasetMapper).
    cfg.INPUT.DATASET_MAPPER = "detr"
    # DETR augmentation: shortest-edge choices and max size of the resize, and the crop branch.
    cfg.INPUT.DETR_RESIZE_MIN_SIZES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    cfg.INPUT.DETR_RESIZE_MAX_SIZE = 1333
    cfg.INPUT.DETR_CROP_PRE_SIZES = [400, 500, 600]
    cfg.INPUT.DETR_CROP_SIZE = [384, 600]
    cfg.INPUT.DETR_CROP_PROB = 0.5  # probability of the crop branch (official 0.5; 0 never crops)
    # Extras for overhead imagery (off officially): rotations by multiples of 90 degrees, colour jitter
    # strength (0 = off), hue jitter in degrees (0 = off), probability of a grey image (0 = off).
    # INPUT.RANDOM_FLIP also takes "both" (horizontal and vertical flips).
    cfg.INPUT.DETR_ROTATE_90 = False
    cfg.INPUT.DETR_COLOR_JITTER = 0.0
    cfg.INPUT.DETR_HUE_JITTER = 0.0
    cfg.INPUT.DETR_GRAYSCALE_PROB = 0.0
    # Probability that a training image becomes a mosaic of four training images at their own scale,
    # one per quadrant around a random centre (sparse_detr/data/mosaic.py; 0 = off).
    cfg.INPUT.DETR_MOSAIC_PROB = 0.0
    # Megabytes of decoded training images each data-loader process keeps in memory (the "detr"
    # mapper; sparse_detr/data/image_cache.py), so that later epochs skip reading and decoding; 0: none.
    cfg.DATALOADER.IMAGE_CACHE_MB = 0

    # Re-estimate the backbone's frozen batch-norm statistics on this many training images before a
    # fresh start (AdaBN; sparse_detr/engine/adapt_batchnorm.py). 0: keep the pretrained statistics.
    cfg.MODEL.BACKBONE.ADAPT_BN_IMAGES = 0
    # Backbone stages (children of the backbone module, e.g. ["res5"]) or blocks of a stage (dotted, e.g.
    # "res4.0") frozen on top of FREEZE_AT, with their input detached: autograd runs no backward through
    # them at all, while the stages before them still train through their own feature levels
    # (sparse_detr/modeling/backbone.py, `detach_stages`).
    cfg.MODEL.BACKBONE.DETACHED_STAGES = []

    # Test-time augmentation (sparse_detr/modeling/test_time_augmentation.py), with Detectron2's keys
    # TEST.AUG.ENABLED / MIN_SIZES / MAX_SIZE / FLIP and two more: rotations by 0/90/180/270 degrees, and
    # the IoU above which boxes of the views are fused (0.55: the weighted-boxes-fusion paper's default).
    cfg.TEST.AUG.ROTATE_90 = False
    cfg.TEST.AUG.FUSION_IOU = 0.55

    # Official optimisation recipe.
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["reference_points", "sampling_offsets"]

    # A wall-clock budget for training, in whole seconds (0: off). When the measured pace shows that
    # SOLVER.MAX_ITER iterations would overrun it, MAX_ITER and STEPS are scaled down together
    # (sparse_detr/engine/time_budget.py); a schedule that fits is unchanged.
    cfg.SOLVER.TRAIN_TIME_BUDGET = 0

    # An exponential moving average of the weights, which becomes the final model
    # (sparse_detr/engine/weight_ema.py; not in the official recipe). DECAY: the average's horizon is
    # about 1 / (1 - DECAY) iterations.
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False
    cfg.SOLVER.EMA.DECAY = 0.9998
    return cfg
