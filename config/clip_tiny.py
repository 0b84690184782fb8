# CLIP from scratch: the tiny ViT-T/4 of config/tiny.py (same batch, steps, lr and augmentation)
# and a text tower, both trained with the contrastive loss, on any captioned dataset:
#   python prepare.py --src=synthetic --out=data/synthetic --image_size=32 --count=10000
#   python lit.py config/clip_tiny.py --data_dir=data/synthetic
#   python probe.py --checkpoint=out/clip_tiny/ckpt.pt --test_dir=data/synthetic \
#       --retrieval_dir=data/synthetic
out_dir = 'out/clip_tiny'
loss = 'clip'
lock_image = False  # both towers trained (True: LiT, config/lit_tiny.py)
model = 'ViT-T/4'  # a random-init image tower
image_size = 16  # 16 px (17 tokens, ~4x faster than 32 px on a CPU); --image_size=32: 32 px
global_batch_size = 128
max_steps = 200
learning_rate = 1e-3
warmup_steps = 20
weight_decay = 0.2
augment = 'rrc'  # random resized crop (area 0.4-1) + flip, as train.py
log_interval = 10
ckpt_interval = 100
device = 'cpu'
