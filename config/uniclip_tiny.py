# UniCLIP (our reading, see docs/baselines.md) on the synthetic set: 2 augmented views and the caption of each
# image in one MP-NCE loss, per-domain-pair scales and offsets, augmentation-aware image embedding.
# Same tower, batch, steps and lr as config/clip_tiny.py and config/tiny.py:
#   python prepare.py --src=synthetic --out=data/synthetic --image_size=32 --count=10000
#   python lit.py config/uniclip_tiny.py --data_dir=data/synthetic
#   python lit.py config/uniclip_tiny.py --data_dir=data/synthetic --aug_embed=False \
#       --domain_similarity=False  # MP-NCE only
#   python probe.py --checkpoint=out/uniclip_tiny/ckpt.pt --test_dir=data/synthetic \
#       --retrieval_dir=data/synthetic
out_dir = 'out/uniclip_tiny'
loss = 'uniclip'
model = 'ViT-T/4'
image_size = 16  # 16 px (17 tokens, ~4x faster than 32 px on a CPU); --image_size=32: 32 px
views = 2
domain_similarity = True
domain_offsets = True
aug_embed = True
global_batch_size = 128  # images per step; each is seen as 2 views + its caption
max_steps = 200
learning_rate = 1e-3
warmup_steps = 20
weight_decay = 0.2
augment = 'rrc'  # random resized crop (area 0.4-1) + flip
color_jitter = 0.5  # colour changes what a caption says ("a red circle"): the augmentation code
                    # tells the image-text terms what was done
log_interval = 10
ckpt_interval = 100
device = 'cpu'
