# MLCD on the built-in synthetic set with the tiny ViT-T/4 tower: a few minutes on 2 CPU cores.
#   python prepare.py --src=synthetic --out=data/synthetic --image_size=32 --count=10000
#   python cluster.py --data_dir=data/synthetic --out_dir=out/cluster --num_classes=1000 --num_positives=8
#   python train.py config/tiny_synthetic.py      # -> out/tiny/ckpt.pt (config/lit_tiny.py reads it)
out_dir = 'out/tiny'
data_dir = 'data/synthetic'
labels_dir = 'out/cluster'
eval_data_dir = 'data/synthetic'  # kNN accuracy on the shape classes, for monitoring only
eval_interval = 100
eval_batch_size = 500
model = 'ViT-T/4'
image_size = 16  # the 32 px images at 16 px (17 tokens): ~4x faster than 32 px on a CPU
global_batch_size = 128
micro_batch_size = 128
max_steps = 200  # ~2.6 epochs of 10K images: ~2.5 min of CPU time (measured: 160 img/s)
learning_rate = 1e-3
warmup_steps = 20
weight_decay = 0.2
num_positives = 8
sample_ratio = 0.1
margin = 0.3
scale = 64.0
log_interval = 10
ckpt_interval = 100
device = 'cpu'
