# MLCD pre-training of ViT-L/14 on the paper's recipe (config/paper.py).
#   torchrun --nproc_per_node=8 train.py config/vitl14.py
import os
exec(open(os.path.join(os.path.dirname(__file__), 'paper.py')).read())
out_dir = 'out/mlcd-vitl14'
model = 'ViT-L/14'
learning_rate = 4e-4  # Table 9
