# SimCLR (NT-Xent over 2 augmented views) on CIFAR-10's training images, no captions and no labels:
# an instance discrimination row beside MLCD, with config/cifar10.py's tower, batch and steps (SimCLR's own lr,
# weight decay and augmentation).
#   mkdir -p data && tar xzf ../shared/datasets/cifar10.tar.gz -C data
#   python prepare.py --src=data/cifar10/train --out=data/cifar10-train --image_size=32
#   python prepare.py --src=data/cifar10/test --out=data/cifar10-test --image_size=32
#   python lit.py config/simclr_cifar10.py
#   python probe.py --checkpoint=out/simclr_cifar10/ckpt.pt --train_dir=data/cifar10-train --test_dir=data/cifar10-test
out_dir = 'out/simclr_cifar10'
data_dir = 'data/cifar10-train'  # an image-only dataset: no text tower is built
loss = 'simclr'
model = 'ViT-T/8'
image_size = 32
global_batch_size = 256
max_steps = 1400
learning_rate = 1e-3
warmup_steps = 10
weight_decay = 0.2
augment = 'rrc'
crop_scale = (0.08, 1.0)  # SimCLR's CIFAR-10 recipe: random resized crop, flip, colour 0.5
color_jitter = 0.5
log_interval = 10
ckpt_interval = 100
device = 'cpu'
