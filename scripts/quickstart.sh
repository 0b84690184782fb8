#!/usr/bin/env bash
# The whole method on the built-in synthetic set, on CPU: build shards -> cluster -> MLCD
# pre-training -> LiT -> linear probe, zero-shot, retrieval -> one results table.
#   bash scripts/quickstart.sh                 # a few minutes on 2 CPU cores, writes out/quickstart
#   QUICK=1 bash scripts/quickstart.sh         # a reduced run (CI's end-to-end test)
#   OUT=out/elsewhere bash scripts/quickstart.sh
#   THREADS=2 bash scripts/quickstart.sh       # CPU threads per stage (default: each stage's own,
#                                              # $OMP_NUM_THREADS or all usable CPUs)
# A stage whose result file exists is skipped (and says so): a re-run finishes what is missing,
# an interrupted training resumes from its checkpoint. Delete a stage's folder to run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/quickstart}
THREADS=${THREADS:-0}
if [ "${QUICK:-0}" = 1 ]; then N=1200; NTEST=400; K=60; STEPS=12; LOG=1; LIT_EPOCHS=2; ITERS=100
else N=6000; NTEST=2000; K=300; STEPS=150; LOG=10; LIT_EPOCHS=2; ITERS=100; fi
# train.py and lit.py take --threads; the other stages read OMP_NUM_THREADS
if [ "$THREADS" -gt 0 ]; then export OMP_NUM_THREADS=$THREADS; fi
run() { echo "+ $*" >&2; "$@"; }
finished() {  # finished <result file>: true, with a note, if that stage already ran
    [ -f "$1" ] && echo "skip: $1 exists (delete its folder to run the stage again)" >&2
}
resume() { [ -f "$1/ckpt.pt" ] && echo --init_from=resume || true; }  # an interrupted training

# 1. data: synthetic images of 1-3 coloured shapes with captions and a shape class
finished "$OUT/train/meta.json" || run python prepare.py --src=synthetic --count=$N --seed=0 --image_size=32 --out="$OUT/train"
finished "$OUT/test/meta.json"  || run python prepare.py --src=synthetic --count=$NTEST --seed=1 --image_size=32 --out="$OUT/test"
# 2. cluster with the pixels teacher (no checkpoint needed): k centres, l = 8 labels per image
finished "$OUT/cluster/cluster.json" || run python cluster.py --data_dir="$OUT/train" --out_dir="$OUT/cluster" \
    --teacher=pixels --num_classes=$K --num_positives=8
# 3. MLCD pre-training of the tiny ViT (config/tiny_synthetic.py), then 4. LiT on its frozen tower
#    (every centre is a negative: with only K centres, r = 0.1 would leave K / 10 negatives)
finished "$OUT/train_mlcd/train.json" || run python train.py config/tiny_synthetic.py --data_dir="$OUT/train" \
    --labels_dir="$OUT/cluster" --out_dir="$OUT/train_mlcd" --eval_data_dir="$OUT/test" --max_steps=$STEPS \
    --log_interval=$LOG --eval_interval=0 --sample_ratio=1.0 --threads=$THREADS $(resume "$OUT/train_mlcd")
finished "$OUT/lit/lit.json" || run python lit.py config/lit_tiny.py --data_dir="$OUT/train" \
    --vision_checkpoint="$OUT/train_mlcd/ckpt.pt" --out_dir="$OUT/lit" --epochs=$LIT_EPOCHS \
    --precompute_features=True --threads=$THREADS $(resume "$OUT/lit")
# 5. evaluate: linear probe on the shape classes, zero-shot from class names, retrieval on captions
#    (ITERS float32 L-BFGS iterations per probe fit: CLIP uses 1,000 in float64, slow on a CPU)
finished "$OUT/probe/probe.json" || run python probe.py --checkpoint="$OUT/lit/ckpt.pt" --train_dir="$OUT/train" \
    --test_dir="$OUT/test" --retrieval_dir="$OUT/test" --out_dir="$OUT/probe" --max_iter=$ITERS --probe_dtype=float32
finished "$OUT/probe_pixels/probe.json" || run python probe.py --checkpoint=pixels --train_dir="$OUT/train" \
    --test_dir="$OUT/test" --out_dir="$OUT/probe_pixels" --zero_shot=False --max_iter=$ITERS --probe_dtype=float32
python scripts/summary.py "$OUT"
