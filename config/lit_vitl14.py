# LiT on the paper's recipe (Tables 9, 10: lit.py's defaults, the 32K batch over 32 epochs) for
# the MLCD ViT-L/14 tower of config/vitl14.py; its text tower is ViT-L/14's (768 wide, 12 layers).
#   torchrun --standalone --nproc_per_node=8 lit.py config/lit_vitl14.py
out_dir = 'out/lit-vitl14'
data_dir = 'data/laion400m'
vision_checkpoint = 'out/mlcd-vitl14/ckpt.pt'
learning_rate = 4e-4  # Table 9 (ViT-L)
# The text tower keeps ~31.5 MB of activations per 77-token caption in bf16 (bench/
# bench_lit_memory.py: 57.1 MB measured in fp32, 31.5 MB under bf16 autocast on the CPU): 1024
# captions are ~32 GB, beside ~12 GB of towers, optimizer, the rank's images and the loss, within
# an 80 GB GPU; the whole 4,096 per GPU of one 8-GPU node would need ~129 GB. 'auto' tries a
# step of the rank's whole share and halves until one fits (the first line says what it chose):
# one node of 80 GB GPUs should get 4 micro-batches of 1024 per step; 80 GPUs: 410 images per
# GPU, one micro-batch, if they fit.
micro_batch_size = 'auto'
