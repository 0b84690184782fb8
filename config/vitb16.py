# MLCD pre-training of ViT-B/16 on the paper's recipe (config/paper.py).
#   torchrun --nproc_per_node=8 train.py config/vitb16.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper.py')).read())
out_dir = 'out/mlcd-vitb16'
model = 'ViT-B/16'
micro_batch_size = 512  # per GPU per forward, bf16, 224px: peak 42.9 GiB measured on an H200 (256: 22.5, 1024: 83.5; docs/gpu.md)
