# UniCLIP's image-image part (our reading, see README) on CIFAR-10's training images: 2 augmented
# views per image, MP-NCE, augmentation-aware embedding; without captions there is one domain pair,
# so the domain similarity is one learnable scale. config/simclr_cifar10.py's tower and budget.
#   python lit.py config/uniclip_cifar10.py    (data as in config/simclr_cifar10.py)
#   python probe.py --checkpoint=out/uniclip_cifar10/ckpt.pt --train_dir=data/cifar10-train --test_dir=data/cifar10-test
out_dir = 'out/uniclip_cifar10'
data_dir = 'data/cifar10-train'
loss = 'uniclip'
model = 'ViT-T/8'
image_size = 32
views = 2
aug_embed = True
global_batch_size = 256
max_steps = 1400
learning_rate = 1e-3
warmup_steps = 10
weight_decay = 0.2
augment = True
augment_kind = 'rrc'
crop_scale = (0.08, 1.0)
color_jitter = 0.5
log_interval = 10
ckpt_interval = 100
device = 'cpu'
