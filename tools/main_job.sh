#!/usr/bin/env bash
# The main job: Sparse DETR on real aerial photographs of tree crowns (DeepForest), on CPU.
#
#   bash tools/main_job.sh                       # Sparse DETR, rho 0.1, objectness selection (see below)
#   bash tools/main_job.sh CONFIG [KEY VALUE..]  # another config (e.g. the dense baseline), optional overrides
#   bash tools/main_job.sh KEY VALUE [KEY VALUE..]  # the default config with overrides (e.g. SEED 1)
#
# The default config depends on the CPU: configs/DeepForest/sparse_detr_R_50_rho_0.1_os_cpu.yaml (tiles at
# their native size) where the CPU has bfloat16 instructions (AVX512-BF16 or AMX),
# sparse_detr_R_50_rho_0.1_os_fp32_cpu.yaml (tiles at 0.8) where it has none and training runs in float32.
#
# 1. sets up the environment (tools/setup.sh, idempotent);
# 2. prepares the DeepForest tiles as COCO json train/val splits under datasets/deepforest (idempotent;
#    the split is geographic, see sparse_detr/data/datasets/deepforest.py);
# 3. trains with projects/SparseDETR/train_net.py (progress every 20 iterations, a checkpoint every
#    SOLVER.CHECKPOINT_PERIOD; an interrupted run is resumed from its last checkpoint when the command
#    is run again) and evaluates the validation split with COCOEvaluator;
# 4. draws detections (of the test-time-augmented model when TEST.AUG.ENABLED) and the scoring network's
#    token selection on every validation tile;
# 5. prints AP, AP50 and the wall time of training + evaluation, and the AP50 of each source photograph
#    (also in ap_by_photograph.json).
# Everything goes to output/main_job/<config name>/ (or to an OUTPUT_DIR given among the overrides).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG=""  # chosen for the CPU after setup (needs torch)
if [[ $# -gt 0 && ( "$1" == *.yaml || "$1" == *.yml ) ]]; then  # else: only overrides, default config
    CONFIG="$1"
    shift
    if [[ ! -f "$CONFIG" ]]; then
        echo "[main_job] config file not found: $CONFIG (usage: bash tools/main_job.sh [CONFIG.yaml] [KEY VALUE ...])" >&2
        exit 2
    fi
fi
if (( $# % 2 )); then
    echo "[main_job] overrides come in KEY VALUE pairs; got an odd number: $*" >&2
    exit 2
fi
PY="$ROOT/.venv/bin/python"
export PYTHONWARNINGS="ignore::FutureWarning"  # torch.jit.script deprecation printed by fvcore at import

bash tools/setup.sh
if [[ -z "$CONFIG" ]]; then
    if "$PY" -c "import sys; from sparse_detr.engine.trainer import cpu_has_native_bfloat16 as k; sys.exit(not k())"; then
        CONFIG=configs/DeepForest/sparse_detr_R_50_rho_0.1_os_cpu.yaml
        echo "[main_job] this CPU has bfloat16 instructions: the tiles at their native size ($CONFIG)"
    else
        CONFIG=configs/DeepForest/sparse_detr_R_50_rho_0.1_os_fp32_cpu.yaml
        echo "[main_job] this CPU has no bfloat16 instructions (float32 training): the tiles at 0.8 ($CONFIG)"
    fi
fi
NAME="$(basename "$CONFIG" .yaml)"
OUT="output/main_job/$NAME"
overrides=("$@")
for (( i = 0; i + 1 < ${#overrides[@]}; i += 2 )); do  # an OUTPUT_DIR override moves everything there
    [[ "${overrides[i]}" == OUTPUT_DIR ]] && OUT="${overrides[i + 1]}"
done
"$PY" -m sparse_detr.data.datasets

# An interrupted run (a checkpoint that is not the final model) is resumed; otherwise start afresh.
resume=()
if [[ -f "$OUT/last_checkpoint" && "$(cat "$OUT/last_checkpoint")" != "model_final.pth" ]]; then
    echo "[main_job] resuming the interrupted run in $OUT from $(cat "$OUT/last_checkpoint")"
    resume=(--resume)
else
    rm -rf "$OUT"
fi
echo "[main_job] training $CONFIG on $(nproc) CPU cores -> $OUT"
start=$(date +%s)
"$PY" projects/SparseDETR/train_net.py --config-file "$CONFIG" "${resume[@]}" "$@" OUTPUT_DIR "$OUT"
wall=$(( $(date +%s) - start ))

echo "[main_job] drawing detections and token selections on the validation tiles -> $OUT/pictures"
demo_flags=$("$PY" - "$CONFIG" "$@" <<'PY'
import sys
from detectron2.config import get_cfg
from sparse_detr import add_sparse_detr_config
cfg = add_sparse_detr_config(get_cfg())
cfg.merge_from_file(sys.argv[1])
cfg.merge_from_list(sys.argv[2:])
# the token selection of a Sparse DETR model; the detections of the TTA model when it is evaluated
print(("--show-tokens " if cfg.MODEL.SPARSE_DETR.RHO > 0 else "") + ("--tta" if cfg.TEST.AUG.ENABLED else ""))
PY
)
"$PY" projects/SparseDETR/demo.py --config-file "$CONFIG" --input datasets/deepforest/val \
    --output "$OUT/pictures" --confidence-threshold 0.3 $demo_flags \
    --opts MODEL.WEIGHTS "$OUT/model_final.pth" "$@"

"$PY" - "$OUT" "$wall" "$CONFIG" <<'PY'
import json, os, sys
from detectron2.data import MetadataCatalog
import sparse_detr.data  # registers the DeepForest splits
from sparse_detr.data.datasets.deepforest import in_training_split, photograph_of_tile
from sparse_detr.evaluation import coco_ap_by_group
out, wall, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(os.path.join(out, "metrics.json")) as f:
    last = [m for m in map(json.loads, f) if "bbox/AP" in m][-1]
tta = (f"; with test-time augmentation (TEST.AUG): AP {last['bbox_TTA/AP']:.1f}  AP50 {last['bbox_TTA/AP50']:.1f}"
       if "bbox_TTA/AP" in last else "")
print(f"[main_job] {config}: AP {last['bbox/AP']:.1f}  AP50 {last['bbox/AP50']:.1f}{tta}  "
      f"(COCO, deepforest_trees_val)  train+eval wall time {wall // 60} min {wall % 60:02d} s")
# AP50 per photograph: where the points are won and lost (one photograph's site is absent from training)
breakdown, gt_json = {}, MetadataCatalog.get("deepforest_trees_val").json_file
for kind, folder in (("plain", "inference"), ("TTA", "inference_TTA")):
    results = os.path.join(out, folder, "coco_instances_results.json")
    if os.path.exists(results):
        breakdown[kind] = coco_ap_by_group(gt_json, results, photograph_of_tile)
        print(f"[main_job] AP50 per photograph ({kind}): " + ";  ".join(
            f"{name} {r['AP50']:.1f} ({r['images']} tile{'s' * (r['images'] != 1)}, {r['boxes']} trees"
            f"{'' if in_training_split(name) else ', a site unseen in training'})" for name, r in breakdown[kind].items()))
with open(os.path.join(out, "ap_by_photograph.json"), "w") as f:
    json.dump(breakdown, f, indent=1)
PY
