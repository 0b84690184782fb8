# MLCD pre-training on the paper's recipe (An et al., ECCV 2024, Tables 9-10): the settings that
# config/vitb32.py, vitb16.py and vitl14.py share; each of them runs this file, then sets its model.
# Data: LAION-400M written by prepare.py; labels: cluster.py on it with k = 1M, l = 8.
data_dir = 'data/laion400m'
labels_dir = 'out/cluster-laion400m-k1m'
learning_rate = 5e-4  # Table 9 (ViT-B; ViT-L: 4e-4)
weight_decay = 0.2
warmup_steps = 2000
epochs = 32
global_batch_size = 32768  # "32K" over all ranks; the nearest multiple of micro x ranks is used
micro_batch_size = 'auto'  # the largest that fits this GPU, tried at start-up (first line);
# measured peaks on an H200, bf16, 224 px: B/16 22.5 / 42.9 / 83.5 GiB at 256 / 512 / 1024 images,
# L/14 39.7 / 73.8 GiB at 128 / 256 (a 40 GB A100 thus gets 128 or less for L/14)
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
