#!/usr/bin/env bash
# The whole method on CPU: build shards -> cluster -> MLCD pre-training -> LiT -> linear probe,
# zero-shot, retrieval -> one results table, in pipeline order.
#   bash scripts/quickstart.sh                 # the built-in synthetic set: ~2 min on 2 CPU cores,
#                                              # writes out/quickstart
#   SRC=path/to/images bash scripts/quickstart.sh   # your images, writes out/<name of SRC>
#   QUICK=1 bash scripts/quickstart.sh         # a reduced run (CI's end-to-end test)
#   OUT=out/elsewhere bash scripts/quickstart.sh
#   THREADS=2 bash scripts/quickstart.sh       # CPU threads per stage (default: each stage's own,
#                                              # $OMP_NUM_THREADS or all usable CPUs)
# SRC is anything prepare.py reads: an image folder (class sub-folders give a linear probe), a
# .tar (or a glob of them) of key.jpg + key.txt, or a path<TAB>caption list (captions give LiT and
# retrieval; a list of images in class folders gives all three evaluations). The settings come from the data (scripts/quickstart_plan.py): its resolution (at
# most 32 px, the tiny tower's), k = N / 20 clusters, a batch of <= 128 with >= 10 per epoch, 30
# epochs (at most 50K images seen); IMAGE_SIZE, K, BATCH or STEPS set in the environment win.
# 20% of every class (or of the captioned pairs) is held out (prepare.py --holdout=0.2) to test on.
# A stage whose result file exists is skipped (and says so): a re-run finishes what is missing,
# an interrupted training resumes from its checkpoint. Delete a stage's folder to run it again.
set -euo pipefail
if [ -n "${SRC:-}" ] && [ "${SRC#/}" = "$SRC" ]; then SRC="$PWD/$SRC"; fi  # before the cd
cd "$(dirname "$0")/.."
THREADS=${THREADS:-0}
# train.py and lit.py take --threads; the other stages read OMP_NUM_THREADS
if [ "$THREADS" -gt 0 ]; then export OMP_NUM_THREADS=$THREADS; fi
run() { echo "+ $*" >&2; "$@"; }
finished() {  # finished <result file>: true, with a note, if that stage already ran
    [ -f "$1" ] && echo "skip: $1 exists (delete its folder to run the stage again)" >&2
}
resume() { [ -f "$1/ckpt.pt" ] && echo --init_from=resume || true; }  # an interrupted training

if [ -z "${SRC:-}" ]; then  # ------------------------------------------ the built-in synthetic set
OUT=${OUT:-out/quickstart}
if [ "${QUICK:-0}" = 1 ]; then N=1200; NTEST=400; K=60; STEPS=12; LOG=1; LIT_EPOCHS=2; ITERS=100
else N=6000; NTEST=2000; K=300; STEPS=150; LOG=10; LIT_EPOCHS=2; ITERS=100; fi

# 1. data: synthetic images of 1-3 coloured shapes with captions and a shape class
finished "$OUT/train/meta.json" || run python prepare.py --src=synthetic --count=$N --seed=0 --image_size=32 --out="$OUT/train"
finished "$OUT/test/meta.json"  || run python prepare.py --src=synthetic --count=$NTEST --seed=1 --image_size=32 --out="$OUT/test"
# 2. cluster with the pixels teacher (no checkpoint needed): k centres, l = 8 labels per image
finished "$OUT/cluster/cluster.json" || run python cluster.py --data_dir="$OUT/train" --out_dir="$OUT/cluster" \
    --teacher=pixels --num_classes=$K --num_positives=8
# 3. MLCD pre-training of the tiny ViT (config/tiny.py) on the 32 px images at 16 px (17 tokens:
#    ~4x faster than 32 px), then 4. LiT on its frozen tower (every centre is a negative: with only
#    K centres, r = 0.1 would leave K / 10 negatives)
finished "$OUT/train_mlcd/train.json" || run python train.py config/tiny.py --data_dir="$OUT/train" \
    --labels_dir="$OUT/cluster" --out_dir="$OUT/train_mlcd" --eval_data_dir="$OUT/test" --max_steps=$STEPS \
    --image_size=16 --log_interval=$LOG --eval_interval=0 --sample_ratio=1.0 --threads=$THREADS $(resume "$OUT/train_mlcd")
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
exit
fi

# ------------------------------------------------------------------------------------ your images
name=$(basename "${SRC%/}"); name=${name%%.*}; name=${name//[^A-Za-z0-9_-]/_}
OUT=${OUT:-out/${name:-images}}
D="$OUT/data"; H="$OUT/data_holdout"
# 1. data: stored once at the chosen size; with classes or captions a held-out part to test on
if [ -f "$D/meta.json" ]; then
    finished "$D/meta.json"
else
    PLAN=$(python scripts/quickstart_plan.py source "$SRC")
    eval "$PLAN"
    run python prepare.py --src="$SRC" --out="$D" --image_size=$IMAGE_SIZE --holdout=$HOLDOUT
fi
PLAN=$(python scripts/quickstart_plan.py data "$D" "$SRC")
eval "$PLAN"
echo "plan: $N training images at ${IMAGE_SIZE} px; k = $K clusters, l = $L labels each; $STEPS steps of $BATCH images" >&2
[ -f "$H/meta.json" ] && HELD=1 || HELD=0
# 2. cluster with the pixels teacher (no checkpoint needed): k centres, l labels per image
finished "$OUT/cluster/cluster.json" || run python cluster.py --data_dir="$D" --out_dir="$OUT/cluster" \
    --teacher=pixels --num_classes=$K --num_positives=$L
# 3. MLCD pre-training of the tiny ViT (config/tiny.py) at the data's resolution; the kNN monitor
#    on the held-out part when it has classes
EVAL=(); if [ "$CLASSES$HELD" = 11 ]; then EVAL=(--eval_data_dir="$H"); fi
finished "$OUT/train_mlcd/train.json" || run python train.py config/tiny.py --data_dir="$D" \
    --labels_dir="$OUT/cluster" --out_dir="$OUT/train_mlcd" --image_size=$IMAGE_SIZE --max_steps=$STEPS \
    --global_batch_size=$BATCH --micro_batch_size=$BATCH --warmup_steps=$WARMUP --num_positives=$L \
    --sample_ratio=$RATIO --log_interval=$LOG --eval_interval=0 --ckpt_interval=$LOG "${EVAL[@]}" \
    --threads=$THREADS $(resume "$OUT/train_mlcd")
TOWER="$OUT/train_mlcd/ckpt.pt"
# 4. LiT on the frozen tower, when there are captions
if [ "$TEXT" = 1 ]; then
    finished "$OUT/lit/lit.json" || run python lit.py config/lit_tiny.py --data_dir="$D" \
        --vision_checkpoint="$TOWER" --out_dir="$OUT/lit" --epochs=$LIT_EPOCHS --global_batch_size=$BATCH \
        --warmup_steps=$WARMUP --precompute_features=True --threads=$THREADS $(resume "$OUT/lit")
    TOWER="$OUT/lit/ckpt.pt"
else
    echo "skip: LiT, zero-shot and retrieval: $SRC has no captions (a .tar of key.jpg + key.txt or a path<TAB>caption list has)" >&2
fi
# 5. evaluate on the held-out part: linear probe on the classes (and raw pixels as the floor),
#    retrieval on the captions; zero-shot needs both: a caption list of images in class folders
if [ "$TEXT" = 1 ] && [ "$CLASSES" = 0 ]; then echo "skip: linear probe and zero-shot: $SRC has no class folders" >&2; fi
if [ "$HELD" = 0 ]; then
    echo "skip: evaluation: $SRC has neither class folders nor captions" >&2
else
    ARGS=(--out_dir="$OUT/probe" --checkpoint="$TOWER" --max_iter=$ITERS --probe_dtype=float32)
    if [ "$CLASSES" = 1 ]; then ARGS+=(--train_dir="$D" --test_dir="$H"); fi
    if [ "$TEXT" = 1 ]; then ARGS+=(--retrieval_dir="$H"); fi
    if [ "$TEXT$CLASSES" != 11 ]; then ARGS+=(--zero_shot=False); fi
    finished "$OUT/probe/probe.json" || run python probe.py "${ARGS[@]}"
    if [ "$CLASSES" = 1 ]; then
        finished "$OUT/probe_pixels/probe.json" || run python probe.py --checkpoint=pixels --train_dir="$D" \
            --test_dir="$H" --out_dir="$OUT/probe_pixels" --zero_shot=False --max_iter=$ITERS --probe_dtype=float32
    fi
fi
python scripts/summary.py "$OUT"
