"""SparseDETR model on CPU with tiny configs: modules alone, training losses and gradients, token counts,
dense equivalence, padding handling, inference output, config validation, Swin backbone."""
import math

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn

from sparse_detr.layers.onednn_linear import OneDNNLinear, onednn_linear_available
from sparse_detr.layers.position_encoding import PositionEmbeddingSine, box_sine_embedding
from sparse_detr.modeling.dam import dam_coverage, decoder_attention_map, topk_token_target
from sparse_detr.modeling import SparseDETR
from sparse_detr.modeling.criterion import SetCriterion, build_weight_dict
from sparse_detr.modeling.decoder import Decoder, DecoderLayer
from sparse_detr.modeling.encoder import SparseEncoder, SparseEncoderLayer
from sparse_detr.modeling.matcher import HungarianMatcher
from sparse_detr.modeling.token_scoring import DAMTokenScorer
from sparse_detr.modeling.transformer import SparseDeformableTransformer, select_tokens
from sparse_detr.modeling.utils import (box_from_delta, encoder_anchors, encoder_reference_points, level_masks,
                                        valid_ratio)
from utils import make_inputs, tiny_cfg


def _build(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**overrides))


def _train_losses(model, inputs):
    model.train()
    with EventStorage():
        return model(inputs)


# ---------------------------------------------------------------------------------------------- modules
def test_position_embedding_of_padded_map_equals_unpadded():
    pe = PositionEmbeddingSine(num_pos_feats=8)
    alone = pe(torch.zeros(1, 5, 7, dtype=torch.bool))
    mask = torch.ones(1, 8, 9, dtype=torch.bool)
    mask[:, :5, :7] = False
    padded = pe(mask)
    assert alone.shape == (1, 16, 5, 7)
    torch.testing.assert_close(padded[..., :5, :7], alone)
    # normalised centre convention: first cell (1 - 0.5) / 7 * 2 pi; sin on channel 0 (x block starts at 8)
    assert alone[0, 8, 0, 0].item() == pytest.approx(math.sin(0.5 / 7 * 2 * math.pi), abs=1e-6)


def test_box_sine_embedding_shape_and_values():
    boxes = torch.zeros(2, 3, 4)  # sigmoid(0) * 2 pi = pi for every coordinate
    emb = box_sine_embedding(boxes, num_pos_feats=16)
    assert emb.shape == (2, 3, 64)
    assert emb[0, 0, 0].item() == pytest.approx(math.sin(math.pi), abs=1e-6)
    assert emb[0, 0, 1].item() == pytest.approx(math.cos(math.pi), abs=1e-6)


def test_level_masks_valid_ratios_and_reference_points():
    image_mask = torch.zeros(1, 64, 96, dtype=torch.bool)
    image_mask[:, :, 48:] = True  # right half padded
    (mask,) = level_masks(image_mask, [(8, 12)])
    assert mask.shape == (1, 8, 12) and (~mask).sum() == 8 * 6
    ratios = valid_ratio(mask)
    torch.testing.assert_close(ratios, torch.tensor([[0.5, 1.0]]))
    ref = encoder_reference_points([(8, 12)], ratios[:, None])
    assert ref.shape == (1, 96, 1, 2)
    # cell (row 0, col 0): centre 0.5 / 6 of the valid width, times the valid ratio 0.5 -> 0.5 / 12
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.5 / 12, 0.5 / 8]))


def test_encoder_anchors_validity_rule():
    # a 1 x 152 level: columns 0, 1, 150, 151 have centres <= 0.01 or >= 0.99 (official rule)
    mask = torch.zeros(1, 152, dtype=torch.bool)
    mask_padded = torch.cat([mask, torch.ones(1, 8, dtype=torch.bool)], 1)
    anchors, valid = encoder_anchors(mask_padded, [(1, 160)])
    assert anchors.shape == (1, 160, 4)
    assert not valid[0, :2].any() and not valid[0, 150:].any() and valid[0, 2:150].all()
    assert torch.isinf(anchors[~valid]).all() and torch.isfinite(anchors[valid]).all()
    # valid anchor: centre relative to the 152 valid columns, size 0.05 (level 0)
    torch.testing.assert_close(anchors[0, 10].sigmoid(), torch.tensor([10.5 / 152, 0.5, 0.05, 0.05]))


def test_select_tokens_counts_and_no_padding():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 50, generator=g)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 20:] = True
    scores[1, 20:] = 100.0  # padding would win if it were not excluded
    topk, counts = select_tokens(scores, mask, 0.3)
    assert counts.tolist() == [int(50 * 0.3) + 1, int(20 * 0.3) + 1]
    assert topk.shape == (2, counts.max())
    assert (topk[1, :counts[1]] < 20).all()
    assert torch.equal(topk[0], scores[0].topk(counts[0]).indices)
    # rho = 1 keeps every valid token (at most the valid count)
    _, counts = select_tokens(scores, mask, 1.0)
    assert counts.tolist() == [50, 20]


def test_dam_conventions_on_a_cell_centre():
    shapes = [(4, 5)]
    start = torch.tensor([0])
    # one point at the centre of cell (col 2, row 1): x = 2.5 / 5, y = 1.5 / 4
    loc = torch.tensor([2.5 / 5, 1.5 / 4]).view(1, 1, 1, 1, 1, 1, 2)
    w = torch.ones(1, 1, 1, 1, 1, 1)
    exact = decoder_attention_map(loc, w, shapes, start, "exact")
    expected = torch.zeros(1, 20)
    expected[0, 1 * 5 + 2] = 1
    torch.testing.assert_close(exact, expected)
    official = decoder_attention_map(loc, w, shapes, start, "official")  # half a cell right/down
    expected = torch.zeros(1, 20)
    expected[0, [7, 8, 12, 13]] = 0.25
    torch.testing.assert_close(official, expected)
    outside = decoder_attention_map(torch.full_like(loc, 1.5), w, shapes, start, "official")
    assert outside.sum() == 0


def test_topk_token_target_excludes_padding():
    dam = torch.tensor([[5.0, 4.0, 3.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[False, False, False, True], [False, False, False, False]])
    target = topk_token_target(dam, mask, torch.tensor([2, 1]))
    torch.testing.assert_close(target, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))


def test_dam_coverage():
    dam = torch.tensor([[1.0, 3.0, 2.0, 2.0], [4.0, 0.0, 1.0, 3.0]])  # two levels of 2 tokens
    corr = dam_coverage(dam, torch.tensor([[1, 2], [3, 0]]), torch.tensor([0, 2]))
    assert corr["corr_mask_attn_map_dec_all"].item() == pytest.approx((5 / 8 + 7 / 8) / 2)
    assert corr["corr_mask_attn_map_dec_0"].item() == pytest.approx((3 / 4 + 4 / 4) / 2)
    assert corr["corr_mask_attn_map_dec_1"].item() == pytest.approx((2 / 4 + 3 / 4) / 2)


def test_sparse_encoder_with_all_tokens_selected_equals_dense():
    torch.manual_seed(0)
    layer = SparseEncoderLayer(d_model=16, d_ffn=32, dropout=0.0, n_levels=2, n_heads=2, n_points=2)
    encoder = SparseEncoder(layer, 2).eval()
    shapes = [(4, 6), (2, 3)]
    n = 30
    src, pos = torch.randn(2, n, 16), torch.randn(2, n, 16)
    ratios = torch.ones(2, 2, 2)
    ref = encoder_reference_points(shapes, ratios)
    args = (torch.tensor(shapes), torch.tensor([0, 24]), torch.zeros(2, n, dtype=torch.bool))
    dense = encoder(src, pos, ref, *args)["memory"]
    perm = torch.stack([torch.randperm(n), torch.randperm(n)])
    sparse = encoder(src, pos, ref, *args, topk_inds=perm, counts=torch.tensor([n, n]))["memory"]
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    # selecting a few tokens: the others keep their input features
    few = encoder(src, pos, ref, *args, topk_inds=perm[:, :5], counts=torch.tensor([5, 3]))["memory"]
    for i, count in enumerate([5, 3]):
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[perm[i, :count]] = False
        torch.testing.assert_close(few[i, untouched], src[i, untouched])
        assert not torch.allclose(few[i, perm[i, :count]], src[i, perm[i, :count]])


# ---------------------------------------------------------------------------------------------- training
def _expected_loss_keys(dec_layers=2, enc_layers=2, two_stage=True, enc_aux=True, rho=True):
    suffixes = [""] + [f"_{i}" for i in range(dec_layers - 1)] + (["_enc"] if two_stage else [])
    suffixes += [f"_enc_{i}" for i in range(enc_layers - 1)] if enc_aux else []
    keys = {f"loss_{n}{s}" for s in suffixes for n in ("ce", "bbox", "giou")}
    return keys | ({"loss_mask_prediction"} if rho else set())


def test_training_step_losses_and_gradients():
    model = _build().train()
    with EventStorage():
        losses = model(make_inputs([(64, 96), (80, 64)]))
        logged = get_event_storage().latest()
    assert set(losses) == _expected_loss_keys()
    assert {f"corr_mask_attn_map_dec_{n}" for n in ("all", 0, 1, 2, 3)} <= set(logged)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # stem and res2 frozen (FREEZE_AT 2), res3 trained
    assert not any(n.startswith(("backbone.stem.", "backbone.res2.")) for n in trainable)
    assert any(n.startswith("backbone.res3.") for n in trainable)


def test_detached_stage_is_frozen_and_cut_from_the_gradient():
    """MODEL.BACKBONE.DETACHED_STAGES ["res5"]: res5 frozen, and res4 receives only the gradient of its
    own feature level (the same as when res5's output is not used at all)."""
    cfg = tiny_cfg()
    cfg.defrost()
    cfg.MODEL.BACKBONE.DETACHED_STAGES = ["res5"]
    cfg.MODEL.RESNETS.NORM = "BN"  # trainable batch norms elsewhere; frozen ones in res5
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert not any(p.requires_grad for p in model.backbone.res5.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.res5.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.res4.modules())
    inputs = make_inputs([(64, 96)])
    torch.manual_seed(1)  # same dropout in both passes
    with EventStorage():
        sum(model(inputs).values()).backward()
    res4 = dict(model.backbone.res4.named_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in res4.values())
    got = {n: p.grad.clone() for n, p in res4.items()}
    # the same gradient when res5's output reaches the model as a constant
    model.zero_grad()
    model.backbone.res5.register_forward_hook(lambda module, args, out: out.detach().clone())
    torch.manual_seed(1)
    with EventStorage():
        sum(model(inputs).values()).backward()
    for n, p in res4.items():
        torch.testing.assert_close(p.grad, got[n])
    cfg.MODEL.BACKBONE.DETACHED_STAGES = ["res6"]
    with pytest.raises(ValueError, match="DETACHED_STAGES.*res6.*'res5'"):
        build_model(cfg)
    cfg.MODEL.BACKBONE.DETACHED_STAGES = ["res4.7"]
    with pytest.raises(ValueError, match=r"DETACHED_STAGES.*res4\.7.*blocks"):
        build_model(cfg)


def test_detached_block_freezes_the_start_of_a_stage():
    """MODEL.BACKBONE.DETACHED_STAGES ["res4.0"] (a block of a stage): that block is frozen and gets no
    gradient, and the stage's next block trains."""
    cfg = tiny_cfg()
    cfg.defrost()
    cfg.MODEL.BACKBONE.DETACHED_STAGES = ["res4.0"]
    cfg.MODEL.RESNETS.NORM = "BN"
    model = build_model(cfg).train()
    frozen, next_block = model.backbone.res4[0], model.backbone.res4[1]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    with EventStorage():
        sum(model(make_inputs([(64, 96)])).values()).backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in next_block.parameters())


def test_look_forward_twice_reaches_the_previous_refinement_head():
    """MODEL.SPARSE_DETR.LOOK_FORWARD_TWICE: layer 1's box loss trains layer 0's refinement head (and only
    then); the layers' outputs and references are the same values either way."""
    torch.manual_seed(0)
    kw = dict(d_model=32, d_ffn=64, dropout=0.0, n_levels=2, n_heads=2, n_points=2)
    plain = Decoder(DecoderLayer(**kw), 2)
    lft = Decoder(DecoderLayer(**kw), 2, look_forward_twice=True)
    lft.load_state_dict(plain.state_dict())
    heads = nn.ModuleList(nn.Linear(32, 4) for _ in range(2))
    B, Q, N = 2, 5, 20
    inputs = (torch.randn(B, Q, 32), torch.randn(B, Q, 32), torch.rand(B, Q, 4) * 0.5 + 0.25,
              torch.randn(B, N, 32), torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16]),
              torch.ones(B, 2, 2), torch.zeros(B, N, dtype=torch.bool))
    outs = {}
    for name, decoder in (("plain", plain), ("lft", lft)):
        heads.zero_grad(set_to_none=True)
        dec = decoder(*inputs, bbox_heads=heads)
        box_from_delta(heads[1](dec["hs"][1]), dec["references"][1]).sum().backward()
        outs[name] = dec, heads[0].weight.grad
    assert outs["plain"][1] is None and outs["lft"][1].abs().sum() > 0
    torch.testing.assert_close(outs["lft"][0]["hs"], outs["plain"][0]["hs"])
    for got, expected in zip(outs["lft"][0]["references"], outs["plain"][0]["references"]):
        torch.testing.assert_close(got, expected)


def test_look_forward_twice_config_trains():
    model = _build(LOOK_FORWARD_TWICE=True)
    assert model.transformer.decoder.look_forward_twice
    losses = _train_losses(model, make_inputs([(64, 96)]))
    assert set(losses) == _expected_loss_keys() and all(torch.isfinite(v) for v in losses.values())


def test_training_step_with_empty_ground_truth():
    model = _build()
    losses = _train_losses(model, make_inputs([(64, 96), (64, 80)], num_boxes=0))
    assert set(losses) == _expected_loss_keys()
    for k, v in losses.items():
        if k.startswith("loss_ce"):
            assert v > 0, k
        elif k.startswith(("loss_bbox", "loss_giou")):
            assert v == 0, k
    assert losses["loss_mask_prediction"] > 0


def test_weighted_losses_use_official_weights():
    model = _build()
    assert model.weight_dict["loss_ce_enc_0"] == 2.0 and model.weight_dict["loss_bbox_0"] == 5.0
    assert model.weight_dict["loss_giou_enc"] == 2.0 and model.weight_dict["loss_mask_prediction"] == 1.0
    inputs = make_inputs([(64, 96)])
    torch.manual_seed(0)
    weighted = _train_losses(model, inputs)
    images = model.preprocess_image(inputs)
    raw = model.run(images, model.rho, with_enc_aux=True)
    with EventStorage():
        unweighted = model.losses(raw, model.prepare_targets(inputs, images))
    for k, v in unweighted.items():
        torch.testing.assert_close(weighted[k], v * model.weight_dict[k])


def test_plain_deformable_detr_config_trains():
    """TWO_STAGE off: learned queries and 2-d reference points; one shared head, no `_enc` losses."""
    model = _build(RHO=0.0, TWO_STAGE=False, WITH_BOX_REFINE=False, EFF_QUERY_INIT=False,
                   EFF_SPECIFIC_HEAD=False, USE_ENC_AUX_LOSS=False)
    assert len(model.class_embed) == 1 and model.transformer.enc_mask_predictor is None
    losses = _train_losses(model, make_inputs([(64, 96)]))
    assert set(losses) == _expected_loss_keys(two_stage=False, enc_aux=False, rho=False)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_box_refine_without_two_stage_refines_points_into_boxes():
    model = _build(RHO=0.0, TWO_STAGE=False, WITH_BOX_REFINE=True, EFF_QUERY_INIT=False,
                   EFF_SPECIFIC_HEAD=False, USE_ENC_AUX_LOSS=False)
    assert len(model.class_embed) == 2  # one head per decoder layer
    losses = _train_losses(model, make_inputs([(64, 96)]))
    assert all(torch.isfinite(v) for v in losses.values())


def test_each_head_tensor_registered_once():
    model = _build()
    params = list(model.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    # decoder 2 + two-stage 1 + encoder aux 1
    assert len(model.class_embed) == len(model.bbox_embed) == 4
    keys = model.state_dict().keys()
    assert "transformer.enc_mask_predictor.layer2.4.weight" in keys and "class_embed.3.bias" in keys
    assert not any(k.startswith(("transformer.decoder.class_embed", "transformer.encoder.bbox_embed")) for k in keys)


# ---------------------------------------------------------------------------------------------- sparsity
def _valid_tokens(h, w, levels=4):
    """Tokens of an unpadded h x w image: ResNet maps at strides 8/16/32 then one stride-2 conv."""
    sizes, total = (h, w), 0
    for lvl in range(levels + 2):
        sizes = tuple((s - 1) // 2 + 1 for s in sizes)  # each stride-2 stage: ceil(s / 2)
        if lvl >= 2:
            total += sizes[0] * sizes[1]
    return total


def test_token_counts_per_image():
    model = _build().eval()
    # multiples of 64 (the stride of the extra level): the nearest-resized masks then match each
    # image's own maps (official mask rule; otherwise a padded image may count a few more valid tokens)
    sizes = [(64, 128), (64, 64), (128, 64)]
    with torch.no_grad():
        out = model.forward_raw(make_inputs(sizes))
    expected = [int(_valid_tokens(h, w) * 0.3) + 1 for h, w in sizes]
    assert out["sparse_token_nums"].tolist() == expected
    valid = (~out["mask_flatten"]).sum(1)
    assert out["sparse_token_nums"].tolist() == [int(v * 0.3) + 1 for v in valid.tolist()]
    assert out["backbone_topk_proposals"].shape == (3, max(expected))
    for i, count in enumerate(expected):
        assert not out["mask_flatten"][i, out["backbone_topk_proposals"][i, :count]].any()
    assert len(out["aux_outputs_enc"]) == 1
    assert out["aux_outputs_enc"][0]["pred_logits"].shape == (3, max(expected), 5)
    assert out["scoring_target"].sum(1).tolist() == expected
    assert out["dam"].shape == out["backbone_mask_prediction"].shape


def test_test_rho_changes_the_number_of_tokens_at_inference():
    model = _build(TEST_RHO=0.5).eval()
    inputs = make_inputs([(64, 96)])
    n = _valid_tokens(64, 96)
    with torch.no_grad():
        assert model.forward_raw(inputs)["sparse_token_nums"].tolist() == [int(n * 0.5) + 1]
        model.train()
        assert model.forward_raw(inputs)["sparse_token_nums"].tolist() == [int(n * 0.3) + 1]


def test_rho_zero_is_the_dense_encoder():
    """RHO 0 runs every token as a query; a sparse model keeping every token (rho 1) computes the same."""
    dense = _build(RHO=0.0).eval()
    sparse = _build(RHO=1.0).eval()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("transformer.enc_mask_predictor.") for k in missing)
    inputs = make_inputs([(64, 96), (64, 96)], seed=3)
    with torch.no_grad():
        out_dense, out_sparse = dense.forward_raw(inputs), sparse.forward_raw(inputs)
    assert "backbone_mask_prediction" not in out_dense
    assert out_sparse["sparse_token_nums"].tolist() == [_valid_tokens(64, 96)] * 2
    for key in ("memory", "pred_logits", "pred_boxes"):
        torch.testing.assert_close(out_sparse[key], out_dense[key], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_unpadded_image_of_a_padded_batch_equals_alone(rho):
    """The batch's largest image has no padding: its detections are those computed alone (batching,
    the per-image K / write-back masks and every per-image operation are independent of the others)."""
    model = _build(RHO=rho).eval()
    inputs = make_inputs([(96, 128), (64, 96)], seed=1)
    with torch.no_grad():
        batch = model(inputs)[0]["instances"]
        alone = model(inputs[:1])[0]["instances"]
    torch.testing.assert_close(batch.scores, alone.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.pred_boxes.tensor, alone.pred_boxes.tensor, atol=1e-3, rtol=0)
    assert torch.equal(batch.pred_classes, alone.pred_classes)


def test_transformer_is_padding_invariant():
    """Given the same projected features on the valid region, a padded batch gives the padded image's
    outputs as alone: masks, valid ratios, positions, anchors, token selection, sampling and queries all
    honour the padding. (The scoring network's global mean, an official quirk, includes padded tokens:
    it is neutralised here by zeroing the weights that read it.)"""
    model = _build().eval()
    tr = model.transformer
    with torch.no_grad():
        tr.enc_mask_predictor.layer2[0].weight[:, 16:] = 0  # the global half of the 32-d hidden state
    pe = model.position_embedding
    g = torch.Generator().manual_seed(0)
    alone_sizes = [(8, 10), (4, 5), (2, 3), (1, 2)]
    padded_sizes = [(10, 14), (5, 7), (3, 4), (2, 2)]
    alone_srcs = [torch.randn(1, 32, h, w, generator=g) for h, w in alone_sizes]
    srcs, masks = [], []
    for src, (h, w) in zip(alone_srcs, padded_sizes):
        padded = torch.randn(2, 32, h, w, generator=g)  # garbage in the padding of image 1
        padded[1, :, :src.shape[2], :src.shape[3]] = src[0]
        mask = torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, src.shape[2]:] = True
        mask[1, :, src.shape[3]:] = True
        srcs.append(padded)
        masks.append(mask)

    def run(srcs, masks):
        x = tr.flatten(srcs, masks, [pe(m) for m in masks])
        enc = model.forward_encoder(x, 0.3, with_aux=False)
        queries = model.pre_decoder(x, enc["memory"])
        out = model.forward_heads(model.forward_decoder(x, enc["memory"], queries), all_layers=True)
        return x, enc, queries, out

    with torch.no_grad():
        xa, enca, qa, outa = run(alone_srcs, [torch.zeros(1, h, w, dtype=torch.bool) for h, w in alone_sizes])
        xb, encb, qb, outb = run(srcs, masks)
    valid = ~xb["mask_flatten"][1]
    assert int(valid.sum()) == xa["src"].shape[1] == 108
    assert encb["sparse_token_nums"][1] == enca["sparse_token_nums"][0] == int(108 * 0.3) + 1
    torch.testing.assert_close(encb["memory"][1, valid], enca["memory"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qb["enc_outputs"]["pred_logits"][1, valid], qa["enc_outputs"]["pred_logits"][0],
                               atol=1e-5, rtol=1e-5)
    assert valid[qb["topk_proposals"][1]].all()  # no padded token among the two-stage queries here
    torch.testing.assert_close(outb["pred_logits"][1], outa["pred_logits"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outb["pred_boxes"][1], outa["pred_boxes"][0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- inference
def test_inference_output_format_and_rescaling():
    model = _build().eval()
    inputs = make_inputs([(64, 96), (64, 80)])
    inputs[1]["height"], inputs[1]["width"] = 128, 160  # requested output twice the input size
    with torch.no_grad():
        results = model(inputs)
    assert len(results) == 2
    for r, (h, w) in zip(results, [(64, 96), (128, 160)]):
        inst = r["instances"]
        assert isinstance(inst, Instances) and inst.image_size == (h, w)
        assert 0 < len(inst) <= 20
        assert inst.has("pred_boxes") and inst.has("scores") and inst.has("pred_classes")
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 5)).all()
        assert (inst.pred_boxes.tensor[:, 2] <= w).all() and (inst.pred_boxes.tensor[:, 3] <= h).all()


def test_encoder_aux_heads_run_at_inference_only_when_asked():
    calls = []
    for flag in (False, True):
        model = _build(ENC_AUX_HEADS_AT_INFERENCE=flag).eval()
        head = model.encoder_aux_heads()[0][0]
        handle = head.register_forward_hook(lambda *_: calls.append(flag))
        with torch.no_grad():
            model(make_inputs([(64, 96)]))
            assert "aux_outputs_enc" in model.forward_raw(make_inputs([(64, 96)]))
        handle.remove()
    assert calls.count(False) == 1 and calls.count(True) == 2  # forward_raw always runs them


def test_exact_dam_convention_trains():
    model = _build(DAM_CONVENTION="exact")
    assert model.transformer.enc_mask_predictor.dam_convention == "exact"
    losses = _train_losses(model, make_inputs([(64, 96)]))
    assert torch.isfinite(losses["loss_mask_prediction"])


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, match", [
    ({"RHO": 1.5}, "RHO=1.5"),
    ({"RHO": -0.1}, "RHO=-0.1"),
    ({"TEST_RHO": 2.0}, "TEST_RHO=2.0"),
    ({"RHO": 0.0, "TEST_RHO": 0.2}, "TEST_RHO=0.2"),
    ({"SELECTION": "random"}, "SELECTION='random'"),
    ({"DAM_CONVENTION": "shifted"}, "DAM_CONVENTION='shifted'"),
    ({"NHEADS": 3}, "NHEADS=3"),
    ({"NUM_FEATURE_LEVELS": 2}, "NUM_FEATURE_LEVELS=2"),
    ({"TWO_STAGE": False}, "EFF_QUERY_INIT"),
    ({"LOOK_FORWARD_TWICE": True, "WITH_BOX_REFINE": False}, "LOOK_FORWARD_TWICE=True acts on refined boxes"),
])
def test_invalid_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(tiny_cfg(**overrides))


def test_extra_levels_and_single_level():
    model = _build(IN_FEATURES=["res5"], NUM_FEATURE_LEVELS=3)
    assert model.input_proj[1][0].in_channels == 512 and model.input_proj[2][0].in_channels == 32
    losses = _train_losses(model, make_inputs([(128, 160)]))
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------------------- Swin
def test_swin_backbone_builds_and_runs():
    cfg = tiny_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_sparse_detr_swin_backbone"
    cfg.MODEL.SPARSE_DETR.IN_FEATURES = ["p1", "p2", "p3"]
    cfg.MODEL.SWIN.EMBED_DIM = 24
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [1, 2, 4, 8]
    torch.manual_seed(0)
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert [shapes[f].stride for f in ("p1", "p2", "p3")] == [8, 16, 32]
    assert [shapes[f].channels for f in ("p1", "p2", "p3")] == [48, 96, 192]
    assert all(hasattr(model.backbone, f"norm{i}") for i in (1, 2, 3))
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("patch_embed.", "layers.0.")) for n in frozen)
    assert not model.backbone.layers[0].training  # frozen stages stay in eval mode
    assert type(model.backbone.layers[3].blocks[1].drop_path).__name__ == "StochasticDepth"
    losses = _train_losses(model, make_inputs([(64, 96)]))
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        assert len(model(make_inputs([(64, 96)]))[0]["instances"]) > 0


def test_build_from_python_arguments():
    """Every module is @configurable: the model can be assembled without a config (LazyConfig style)."""
    backbone = _build().backbone
    kw = dict(d_model=32, d_ffn=64, dropout=0.0, n_levels=4, n_heads=2, n_points=2)
    transformer = SparseDeformableTransformer(
        encoder=SparseEncoder(SparseEncoderLayer(**kw), 2), decoder=Decoder(DecoderLayer(**kw), 2),
        scorer=DAMTokenScorer(d_model=32, hidden_dim=32), d_model=32, num_feature_levels=4, two_stage=True,
        eff_query_init=True, eff_specific_head=True, num_queries=10)
    model = SparseDETR(
        backbone=backbone, in_features=["res3", "res4", "res5"], transformer=transformer,
        criterion=SetCriterion(5, HungarianMatcher()), weight_dict=build_weight_dict(2, 5, 2, 1, 2, True, 1),
        num_classes=5, num_queries=10, num_feature_levels=4, rho=0.3, test_rho=0.3, aux_loss=True,
        with_box_refine=True, use_enc_aux_loss=True, enc_aux_heads_at_inference=False,
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    losses = _train_losses(model, make_inputs([(64, 96)]))
    assert set(losses) == _expected_loss_keys()
    # same default as MODEL.SPARSE_DETR.CPU_ONEDNN_LINEAR where oneDNN's linear exists
    assert isinstance(model.transformer.encoder.layers[0].linear1, OneDNNLinear) == onednn_linear_available()
