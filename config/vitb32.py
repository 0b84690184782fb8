# MLCD pre-training of ViT-B/32 on the paper's recipe (config/paper.py).
#   torchrun --nproc_per_node=8 train.py config/vitb32.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper.py')).read())
out_dir = 'out/mlcd-vitb32'
model = 'ViT-B/32'
