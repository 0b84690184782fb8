# MLCD on CIFAR-10 (32 x 32) with the tiny ViT-T/4 tower on a CPU, labels from pixel clusters:
#   mkdir -p data && tar xzf ../shared/datasets/cifar10.tar.gz -C data
#   python data.py --src=data/cifar10/train --out=data/cifar10-train --image_size=32
#   python data.py --src=data/cifar10/test --out=data/cifar10-test --image_size=32
#   python cluster.py --data_dir=data/cifar10-train --out_dir=out/cluster-cifar10 --num_classes=1000 --num_positives=8
#   python train.py config/cifar10.py
#   python probe.py --checkpoint=out/cifar10/ckpt.pt --train_dir=data/cifar10-train --test_dir=data/cifar10-test
# (on a GPU, --device=cuda --max_steps=0 runs all 32 epochs; not measured here)
out_dir = 'out/cifar10'
data_dir = 'data/cifar10-train'
labels_dir = 'out/cluster-cifar10'  # k = 1000 centres, l = 8 labels per image
eval_data_dir = 'data/cifar10-test'  # kNN accuracy on the 10 classes at the end, for monitoring
eval_batch_size = 500
model = 'ViT-T/4'
image_size = 32
global_batch_size = 128
micro_batch_size = 128
epochs = 32
max_steps = 100  # on a CPU: 1/4 epoch, ~5 min at the 30-40 img/s measured on 2 busy cores
learning_rate = 1e-3
warmup_steps = 10
weight_decay = 0.2
num_positives = 8
sample_ratio = 0.1
margin = 0.3
scale = 64.0
log_interval = 10
ckpt_interval = 100
device = 'cpu'
