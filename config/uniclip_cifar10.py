# UniCLIP's image-image part (our reading, see docs/baselines.md) on CIFAR-10's training images: 2 augmented
# views per image, MP-NCE, augmentation-aware embedding; without captions there is one domain pair,
# so the domain similarity is one learnable scale. config/simclr_cifar10.py's data, tower, budget
# and augmentation (this file runs it, then sets what differs).
#   python lit.py config/uniclip_cifar10.py    (data as in config/simclr_cifar10.py)
#   python probe.py --checkpoint=out/uniclip_cifar10/ckpt.pt --train_dir=data/cifar10-train --test_dir=data/cifar10-test
import os
exec(open(os.path.join(os.path.dirname(__file__), 'simclr_cifar10.py')).read())
out_dir = 'out/uniclip_cifar10'
loss = 'uniclip'
views = 2
aug_embed = True
