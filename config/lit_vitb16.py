# LiT on the paper's recipe (Tables 9, 10: lit.py's defaults, the 32K batch over 32 epochs) for
# the MLCD ViT-B/16 tower of config/vitb16.py (for ViT-B/32: --vision_checkpoint=
# out/mlcd-vitb32/ckpt.pt, the same text tower); its text tower is ViT-B's (512 wide, 12 layers).
#   torchrun --standalone --nproc_per_node=8 lit.py config/lit_vitb16.py
out_dir = 'out/lit-vitb16'
data_dir = 'data/laion400m'
vision_checkpoint = 'out/mlcd-vitb16/ckpt.pt'
learning_rate = 5e-4  # Table 9 (ViT-B)
# The text tower keeps ~21.0 MB of activations per 77-token caption in bf16 (bench/
# bench_lit_memory.py: 38.1 MB measured in fp32, 21.0 MB under bf16 autocast on the CPU): 2048
# captions are ~43 GB, beside ~8 GB of towers, optimizer, the rank's images and the loss, within
# an 80 GB GPU. 'auto' tries a step of the rank's whole share and halves until one fits (the first
# line says what it chose): one 8-GPU node of 80 GB should get 2 micro-batches of 2048 per step
# (4,096 would need ~86 GB of captions); 80 GPUs: one of 410.
micro_batch_size = 'auto'
