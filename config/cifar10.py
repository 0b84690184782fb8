# MLCD on CIFAR-10 at 32 px on a CPU (scripts/reproduce_cifar10.py runs it for every variant),
# labels from the pixels teacher's k = 1000 clusters. By hand:
#   mkdir -p data && tar xzf ../shared/datasets/cifar10.tar.gz -C data
#   python prepare.py --src=data/cifar10/train --out=data/cifar10-train --image_size=32
#   python prepare.py --src=data/cifar10/test --out=data/cifar10-test --image_size=32
#   python cluster.py --data_dir=data/cifar10-train --out_dir=out/cluster-cifar10 --num_classes=1000 --num_positives=8
#   python train.py config/cifar10.py
#   python probe.py --checkpoint=out/cifar10/ckpt.pt --train_dir=data/cifar10-train --test_dir=data/cifar10-test
# The settings below were chosen on a validation split of the training images (docs/reproduction.md).
out_dir = 'out/cifar10'
data_dir = 'data/cifar10-train'
labels_dir = 'out/cluster-cifar10'  # k = 1000 centres, l = 8 labels per image
model = 'ViT-T/8'  # 32 px in 4 x 4 patches of 8 px: 17 tokens, width 128, 4 layers
global_batch_size = 256
micro_batch_size = 256
max_steps = 1400  # 7.2 epochs of 50K images
learning_rate = 5e-4
min_lr = 5e-4  # a constant rate after the warm-up
warmup_steps = 100
weight_decay = 0.05
augment = 'pad_crop'  # reflect-pad 4, random 32 x 32 crop, flip: CIFAR's usual recipe
num_positives = 8
sample_ratio = 0.1
margin = 0.3
scale = 32.0  # sigma = 64 fitted the labels less well at this size (docs/reproduction.md)
log_interval = 50
ckpt_interval = 500
device = 'cpu'
