# MLCD pre-training of ViT-B/32, the paper's recipe (An et al., ECCV 2024, Tables 9-10).
#   torchrun --nproc_per_node=8 train.py config/vitb32.py
# Data: LAION-400M written by prepare.py; labels: cluster.py on it with k = 1M, l = 8.
out_dir = 'out/mlcd-vitb32'
data_dir = 'data/laion400m'
labels_dir = 'out/cluster-laion400m-k1m'
model = 'ViT-B/32'
learning_rate = 5e-4  # Table 9
weight_decay = 0.2
warmup_steps = 2000
epochs = 32
global_batch_size = 32768  # "32K" over all ranks; the nearest multiple of micro x ranks is used
micro_batch_size = 512  # per GPU per forward, bf16, 224px: B/16 at 512 peaked at 42.9 GiB on an H200; B/32 needs less
grad_clip = 1.0  # not given in the paper
num_classes = 1_000_000  # k (Table 5: 1M best)
num_positives = 8  # l (Table 5)
sample_ratio = 0.1  # r (Table 5)
margin = 0.3  # appendix
scale = 64.0  # not given in the paper; the ArcFace / UNICOM value
loss_type = 'mlcd'  # Eq. 5
dtype = 'bfloat16'
ckpt_interval = 1000
log_interval = 10
