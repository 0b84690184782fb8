# MLCD with the tiny ViT-T/4 tower on a CPU, for any prepared dataset (no paths of its own):
#   python prepare.py --src=path/to/images --out=data/mine --image_size=32
#   python cluster.py --data_dir=data/mine --out_dir=out/mine_cluster --num_classes=100
#   python train.py config/tiny.py --data_dir=data/mine --labels_dir=out/mine_cluster \
#       --out_dir=out/mine_mlcd [--eval_data_dir=data/mine_test]
# or all of it, with settings chosen from the data: SRC=path/to/images bash scripts/quickstart.sh
out_dir = 'out/tiny'
eval_interval = 100  # with --eval_data_dir (classes): kNN accuracy, for monitoring only
eval_batch_size = 500
model = 'ViT-T/4'
image_size = 0  # the preset's 32 px (65 tokens), CIFAR's and the synthetic set's own: pass
                # --image_size=S for data stored at S px (16 px is ~4x faster on a CPU)
global_batch_size = 128
micro_batch_size = 128
max_steps = 200  # ~2.6 epochs of 10K images
learning_rate = 1e-3
warmup_steps = 20
weight_decay = 0.2
num_positives = 0  # l: every column of the labels (cluster.py keeps 8 by default)
sample_ratio = 0.1
margin = 0.3
scale = 64.0
log_interval = 10
ckpt_interval = 100
device = 'cpu'
