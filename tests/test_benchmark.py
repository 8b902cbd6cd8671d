"""projects/SparseDETR/benchmark.py end to end on a tiny model (CPU, a few seconds)."""
import importlib.util
import json
import os

import pytest
import torch
from detectron2.modeling import build_model

from utils import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def bm():
    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "projects/SparseDETR/benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RHOS = [0.0, 0.2, 0.5]


@pytest.fixture(scope="module")
def results(bm, tmp_path_factory):
    """One tiny run: every rho, batch sizes 1 and 2, FLOPs on a 128x160 image, profiles."""
    out = tmp_path_factory.mktemp("benchmark")
    rows = bm.run_benchmark(tiny_cfg(), RHOS, batch_sizes=[1, 2], image_size=(64, 96), flops_image_size=(128, 160),
                            warmup=1, iters=5, profile_dir=str(out), log=lambda s: None)
    return rows, out


def test_rows_flops_and_stages(bm, results):
    rows, _ = results
    assert [r["rho"] for r in rows] == RHOS
    assert rows[1]["flops"] < rows[2]["flops"]  # fewer encoder queries at smaller rho, same image
    assert rows[0]["flops_scoring"] == 0 and rows[1]["flops_scoring"] > 0  # dense: no scoring network
    for r in rows:
        stages = [r[f"flops_{s}"] for s in bm.STAGES]
        assert sum(stages) == pytest.approx(r["flops"])
        assert all(r[f"flops_{s}"] > 0 for s in bm.STAGES if s != "scoring")
        assert r["params_paper"] < r["params_all"]  # frozen stem/res2 (and aux heads) left out


def test_encoder_flops_match_hand_count(results):
    """The encoder's FLOPs grow by exactly the per-query cost of its layers (linear layers, layer norms,
    grid_sample at 4 per output element) times the extra selected tokens."""
    rows, _ = results
    sd = tiny_cfg().MODEL.SPARSE_DETR
    C, F, M, L, P = sd.HIDDEN_DIM, sd.DIM_FEEDFORWARD, sd.NHEADS, sd.NUM_FEATURE_LEVELS, sd.ENC_N_POINTS
    per_query = (C * M * L * P * 2 + C * M * L * P + C * C + 2 * C * F  # offsets, weights, output_proj, FFN
                 + 2 * 5 * C  # two layer norms
                 + 4 * M * (C // M) * L * P)  # grid_sampler
    n = sum(h * w for h, w in [(16, 20), (8, 10), (4, 5), (2, 3)])  # 128x160: strides 8, 16, 32, 64
    k = [int(n * rho) + 1 for rho in RHOS[1:]]
    assert rows[2]["flops_encoder"] - rows[1]["flops_encoder"] == sd.ENC_LAYERS * per_query * (k[1] - k[0])


def test_latency_profile_table_plot(bm, results, tmp_path):
    rows, out = results
    for r in rows:
        for b in (1, 2):
            lat = r["latency"][b]
            assert len(lat["times_s"]) == 5 and lat["latency_s"] > 0 and lat["cpu_s"] > 0 and lat["peak_mem_mib"] >= 0
            assert lat["fps"] == pytest.approx(b / lat["latency_s"]) and lat["min_s"] <= lat["latency_s"]
        assert (out / f"profile_rho{r['rho']}.txt").exists()
        assert any(p["kind"] == "stage" and p["name"] == "backbone" for p in r["profile"])
    lines = bm.markdown_table(rows).splitlines()
    assert len(lines) == 2 + len(RHOS)
    assert "latency b2 (ms)" in lines[0] and "best b2 (ms)" in lines[0] and lines[2].startswith("| 0 (dense) |")
    png = tmp_path / "plot.png"
    bm.plot_results(rows, str(png), "tiny")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_parameters_paper_count_leaves_out_encoder_aux_heads(bm):
    cfg = bm.config_for_rho(tiny_cfg(), 0.3)
    model = build_model(cfg)
    counts = bm.count_parameters(model)
    aux = sum(p.numel() for heads in model.encoder_aux_heads() for h in heads for p in h.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert aux > 0 and frozen > 0
    assert counts["params_paper"] == counts["params_all"] - aux - frozen


def test_config_for_rho(bm):
    dense = bm.config_for_rho(tiny_cfg(), 0.0)
    assert dense.MODEL.SPARSE_DETR.RHO == 0 and not dense.MODEL.SPARSE_DETR.USE_ENC_AUX_LOSS
    official = bm.config_for_rho(tiny_cfg(), 0.1, as_official=True)
    assert official.MODEL.SPARSE_DETR.NUM_CLASSES == 91 and official.MODEL.SPARSE_DETR.ENC_AUX_HEADS_AT_INFERENCE
    assert bm.paper_row(official, 0.1) is None  # tiny R-18: no paper row
    r50 = tiny_cfg()
    r50.MODEL.RESNETS.DEPTH = 50
    assert bm.paper_row(r50, 0.1)["gflops"] == 105.4 and bm.paper_row(r50, 0.0)["ap"] == 46.0


def test_main_writes_outputs(bm, tmp_path, monkeypatch, capsys):
    """The command line with a shipped config, shrunk through config overrides; --amp on a CPU without
    bfloat16 instructions is warned about and noted in the report."""
    monkeypatch.setattr(bm, "cpu_has_native_bfloat16", lambda: False)
    cfg = tiny_cfg()
    opts = []
    for key in ("NUM_CLASSES", "HIDDEN_DIM", "NHEADS", "DIM_FEEDFORWARD", "ENC_LAYERS", "DEC_LAYERS", "ENC_N_POINTS",
                "DEC_N_POINTS", "NUM_QUERIES"):
        opts += [f"MODEL.SPARSE_DETR.{key}", str(getattr(cfg.MODEL.SPARSE_DETR, key))]
    opts += ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    rows = bm.main(["--config-file", os.path.join(ROOT, "configs/COCO-Detection/sparse_detr_R_50_rho_0.1.yaml"),
                    "--rho", "0.0", "0.1", "--flops-image", "64x96", "--skip-latency", "--threads", "1",
                    "--output-dir", str(tmp_path), "--amp", *opts])
    assert len(rows) == 2
    assert "without bfloat16 instructions" in capsys.readouterr().err
    report = (tmp_path / "benchmark.md").read_text()
    assert "load average" in report and "| 0.1 |" in report and "no bfloat16 instructions on this CPU" in report
    assert len(json.loads((tmp_path / "benchmark.json").read_text())["rows"]) == 2
    assert (tmp_path / "benchmark.png").exists()


def test_amp_latency_runs_in_bfloat16_on_cpu(bm):
    model = build_model(bm.config_for_rho(tiny_cfg(), 0.2)).eval()
    dtypes = []
    model.transformer.encoder.layers[0].linear1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    (r,) = bm.measure_latency([model], bm.random_batch(1, (64, 96)), warmup=1, iters=5, amp=True)
    assert len(r["times_s"]) == 5 and set(dtypes) == {bm.autocast_dtype(model.device)} == {torch.bfloat16}


def test_official_count_adds_the_decoder_auxiliary_heads(bm):
    """Inference computes the class and box heads of the last decoder layer only; the official code runs
    them on every layer."""
    cfg = bm.config_for_rho(tiny_cfg(), 0.2)
    model = build_model(cfg).eval()
    sd = cfg.MODEL.SPARSE_DETR
    ours, official = (bm.count_flops(model, (64, 96), official=o)["flops"] for o in (False, True))
    d, q = sd.HIDDEN_DIM, sd.NUM_QUERIES
    per_layer = q * (d * sd.NUM_CLASSES + 2 * d * d + d * 4)  # class head + 3-layer box MLP
    assert official - ours == (sd.DEC_LAYERS - 1) * per_layer
