#!/usr/bin/env bash
# Small-scale reproduction of the paper's ablations on real images: CIFAR-10's 50K training
# images (labels unused until the probe), clustered, then the same tiny ViT pre-trained as
#   a) MLCD l=8 r=0.1  b) MLC l=8 (Table 6)  c) single label l=1 (UNICOM)  d) MLCD r=1.0 (Table 5b)
#   a2) MLCD l=8 on labels re-clustered with a)'s tower (the second round of cluster discrimination)
# against the baselines e) random-init ViT, f) raw pixels, g) the same ViT on the true labels;
# each linear-probed on the 10K test images.
#   bash scripts/reproduce_cifar10.sh                    # ../shared/datasets/cifar10.tar.gz
#   CIFAR=path/to/cifar10.tar.gz STEPS=600 IMG=32 bash scripts/reproduce_cifar10.sh
# Every variant runs the same STEPS steps of BATCH images. The probe is CLIP's protocol with
# PROBE_ITERS=100 float32 L-BFGS iterations per fit instead of 1,000 in float64 (CPU time: one
# 40K x 3072 pixel fit takes about a minute here). Results in $OUT/summary.json and
# $OUT/results.md, the plot in $OUT/results.png. Finished stages are skipped on a re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
main() {  # the whole script is parsed before it runs, so editing it mid-run is safe
CIFAR=${CIFAR:-../shared/datasets/cifar10.tar.gz}
OUT=${OUT:-out/cifar10}
STEPS=${STEPS:-400}; BATCH=${BATCH:-256}; K=${K:-1000}; IMG=${IMG:-16}; PROBE_ITERS=${PROBE_ITERS:-100}
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$@"; }

# data: unpack (members checked: no absolute paths or '..') and build uint8 shards
if [ ! -f "$OUT/data/test/meta.json" ]; then
    [ -f "$CIFAR" ] || { echo "reproduce_cifar10.sh: $CIFAR not found (set CIFAR=...)" >&2; exit 1; }
    run python -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$CIFAR" "$OUT/src"
    run python prepare.py --src="$OUT/src/cifar10/train" --out="$OUT/data/train" --image_size=32 --overwrite=True
    run python prepare.py --src="$OUT/src/cifar10/test" --out="$OUT/data/test" --image_size=32 --overwrite=True
    rm -rf "$OUT/src"
fi
D="$OUT/data/train"; T="$OUT/data/test"

# round 1 clustering with the pixels teacher; the true labels as a 'clustering' for g)
run python cluster.py --data_dir="$D" --out_dir="$OUT/cluster_pixels" --teacher=pixels --num_classes=$K --num_positives=8
mkdir -p "$OUT/true_labels"
python -c "import numpy as np, sys; c = np.load(sys.argv[1] + '/classes.npy'); np.save(sys.argv[2] + '/labels.npy', c[:, None].astype(np.int32))" "$D" "$OUT/true_labels"

train() {  # name labels_dir extra-args...
    local name=$1 labels=$2; shift 2
    [ -f "$OUT/$name/train.json" ] || run python train.py config/cifar10.py --data_dir="$D" \
        --labels_dir="$labels" --out_dir="$OUT/$name" --max_steps=$STEPS --global_batch_size=$BATCH \
        --micro_batch_size=$BATCH --image_size=$IMG --eval_data_dir="$T" "$@"
}
probe() {  # name checkpoint image_size
    [ -f "$OUT/$1/probe.json" ] || run python probe.py --checkpoint="$2" --train_dir="$D" --test_dir="$T" \
        --out_dir="$OUT/$1" --zero_shot=False --max_iter=$PROBE_ITERS --probe_dtype=float32 --image_size=$3
}
train a_mlcd       "$OUT/cluster_pixels" --loss_type=mlcd --num_positives=8 --sample_ratio=0.1
train b_mlc        "$OUT/cluster_pixels" --loss_type=mlc  --num_positives=8 --sample_ratio=0.1
train c_single     "$OUT/cluster_pixels" --loss_type=mlc  --num_positives=1 --sample_ratio=0.1
train d_mlcd_r1    "$OUT/cluster_pixels" --loss_type=mlcd --num_positives=8 --sample_ratio=1.0
# g) the true labels, as a 10-way normalised softmax. No margin: with m = 0.3 and only 10 classes
# a random-init tower collapses to the antipode of every centre (pos and neg cosine -> -1)
train g_supervised "$OUT/true_labels"    --loss_type=mlc  --num_positives=1 --sample_ratio=1.0 --num_classes=10 --margin=0.0
# round 2: re-cluster with a)'s tower, train a fresh tower on the new labels
run python cluster.py --data_dir="$D" --out_dir="$OUT/cluster_round2" --teacher="$OUT/a_mlcd/ckpt.pt" --num_classes=$K --num_positives=8
train a2_mlcd_round2 "$OUT/cluster_round2" --loss_type=mlcd --num_positives=8 --sample_ratio=0.1
# e) a random-init tower: the same architecture, seed and image size as the others, no training
mkdir -p "$OUT/e_random"
[ -f "$OUT/e_random/ckpt.pt" ] || python -c "
import sys, torch, model
torch.manual_seed(1337)
v, _ = model.create('ViT-T/4', image_size=int(sys.argv[2]))
torch.save({'vision_config': v.config, 'vision': v.state_dict()}, sys.argv[1])" "$OUT/e_random/ckpt.pt" $IMG

for v in a_mlcd b_mlc c_single d_mlcd_r1 g_supervised a2_mlcd_round2 e_random; do probe $v "$OUT/$v/ckpt.pt" $IMG; done
probe f_pixels pixels 32  # the raw 32 x 32 pixels, the classic baseline
python scripts/summary.py "$OUT"
python scripts/plot_cifar10.py "$OUT"
}
main "$@"
