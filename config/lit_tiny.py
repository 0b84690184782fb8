# LiT on the tiny ViT-T/4 tower of config/tiny.py, a few minutes on a CPU, any captioned dataset:
#   python prepare.py --src=synthetic --out=data/synthetic --image_size=32 --count=10000
#   python cluster.py ... && python train.py config/tiny.py --data_dir=data/synthetic ...
#       (the image tower: out/tiny/ckpt.pt)
#   python lit.py config/lit_tiny.py --data_dir=data/synthetic [--precompute_features=True]
#   python probe.py --checkpoint=out/lit_tiny/ckpt.pt --test_dir=data/synthetic \
#       --retrieval_dir=data/synthetic
out_dir = 'out/lit_tiny'
vision_checkpoint = 'out/tiny/ckpt.pt'  # any image tower checkpoints.from_pretrained reads
global_batch_size = 128
epochs = 2
learning_rate = 1e-3
warmup_steps = 20
weight_decay = 0.2
log_interval = 10
ckpt_interval = 100
augment = 'none'  # then full mode and precompute_features=True train on exactly the same inputs
device = 'cpu'
