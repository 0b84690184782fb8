"""
Image transforms for the loader. Per-sample augmentation parameters are drawn on the host from a
seeded generator: a crop box (cx, cy, w, h as fractions of the stored image, on whole pixels), a
flip and optionally colour factors. They are applied in one of two ways that agree up to rounding:
on a CPU in uint8 (crop_resize_cpu), elsewhere as one batched grid_sample (resized_crop).
"""
import math

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def crop_params(n, generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), attempts=10, size=None):
    """RandomResizedCrop boxes as fractions of the image: [n, 4] (cx, cy, w, h), and flips [n] bool.
    Area fraction ~ U(scale), log aspect ~ U(log ratio); the first of `attempts` draws that fits
    is used, else the whole image (the torchvision recipe). With `size`, w and h are rounded to
    whole pixels of a size x size image and the box is placed at a uniform whole-pixel offset, as
    torchvision's get_params does; without, the box is continuous."""
    s = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                             generator=generator)
    w, h = torch.sqrt(s * torch.exp(logr)), torch.sqrt(s / torch.exp(logr))
    if size:
        w, h = torch.round(w * size) / size, torch.round(h * size) / size
    ok = (w <= 1) & (h <= 1) & (w > 0) & (h > 0)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)
    w = torch.where(ok.any(1), w.gather(1, first)[:, 0], torch.ones(n))
    h = torch.where(ok.any(1), h.gather(1, first)[:, 0], torch.ones(n))
    u = torch.rand(n, 3, generator=generator)
    if size:  # offsets uniform over {0, ..., size - w}, in pixels
        wp, hp = torch.round(w * size), torch.round(h * size)
        x0 = torch.minimum(torch.floor(u[:, 0] * (size - wp + 1)), size - wp)
        y0 = torch.minimum(torch.floor(u[:, 1] * (size - hp + 1)), size - hp)
        cx, cy = (x0 + wp / 2) / size, (y0 + hp / 2) / size
    else:
        cx, cy = w / 2 + (1 - w) * u[:, 0], h / 2 + (1 - h) * u[:, 1]
    return torch.stack([cx, cy, w, h], 1), u[:, 2] < 0.5


def pad_params(n, generator, size, pad):
    """Reflect-pad by `pad` pixels, crop size x size at a uniform offset, flip (the CIFAR recipe):
    boxes [n, 4] of the whole image shifted by whole pixels in [-pad, pad], and flips [n] bool."""
    o = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator).float() - pad
    flip = torch.rand(n, generator=generator) < 0.5
    one = torch.ones(n)
    return torch.stack([0.5 + o[:, 0] / size, 0.5 + o[:, 1] / size, one, one], 1), flip


def color_params(n, generator, strength):
    """SimCLR's colour distortion at strength s: with probability 0.8 brightness, contrast and
    saturation factors ~ U(max(0, 1 - 0.8s), 1 + 0.8s) and a hue shift ~ U(-0.2s, 0.2s) (else the
    identity 1, 1, 1, 0), and grayscale with probability 0.2: [n, 5] (b, c, s, hue, gray 0/1)."""
    u = torch.rand(n, 6, generator=generator)
    lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    on = (u[:, 0] < 0.8)[:, None]
    bcs = torch.where(on, lo + (hi - lo) * u[:, 1:4], torch.ones(n, 3))
    hue = torch.where(on[:, 0], (2 * u[:, 4] - 1) * min(0.2 * strength, 0.5), torch.zeros(n))
    return torch.cat([bcs, hue[:, None], (u[:, 5] < 0.2).float()[:, None]], 1)


def _gray(x):
    # ITU-R 601 luma, torchvision's rgb_to_grayscale weights; [B,3,H,W] -> [B,1,H,W]
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x, hue):
    """Rotate the hue of x [B,3,H,W] (any scale >= 0) by hue [B] turns, through HSV."""
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    s = c / torch.where(v > 0, v, torch.ones_like(v))
    r, g, b = ((v[:, None] - x) / torch.where(c > 0, c, torch.ones_like(c))[:, None]).unbind(1)
    h = torch.where(x[:, 0] == v, b - g, torch.where(x[:, 1] == v, 2 + r - b, 4 + g - r))
    h = torch.remainder(h / 6 + hue.view(-1, 1, 1), 1.0) * 6  # sector position in [0, 6)
    # HSV -> RGB: channel n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6, n = 5, 3, 1
    k = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(k + h[:, None], 6)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def color_jitter(x, params):
    """x float [B,3,H,W] in 0..255, params [B,5] from color_params -> distorted x. torchvision's
    ColorJitter operations (brightness, contrast, saturation, hue) in this fixed order, then
    RandomGrayscale; each op with its factor 1 (hue 0) leaves the image unchanged."""
    f = params.to(x.device, x.dtype)
    b, c, s = (f[:, k].view(-1, 1, 1, 1) for k in range(3))
    x = (x * b).clamp_(0, 255)
    x = (c * x + (1 - c) * _gray(x).mean((1, 2, 3), keepdim=True)).clamp_(0, 255)
    x = (s * x + (1 - s) * _gray(x)).clamp_(0, 255)
    if (f[:, 3] != 0).any():
        x = _hue_shift(x, f[:, 3])
    return torch.where(f[:, 4].view(-1, 1, 1, 1) > 0.5, _gray(x).expand_as(x), x)


def _pixel_boxes(boxes, H, W):
    """Fractions -> whole pixels: int64 [n, 4] (x0, y0, w, h)."""
    w, h = torch.round(boxes[:, 2] * W), torch.round(boxes[:, 3] * H)
    x0, y0 = torch.round(boxes[:, 0] * W - w / 2), torch.round(boxes[:, 1] * H - h / 2)
    return torch.stack([x0, y0, w, h], 1).long()


def _reflect(i, n):
    # numpy's 'reflect' padding as an index map: -1 -> 1, n -> n - 2 (for pads < n)
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def crop_resize_cpu(u8, boxes, flip, size, norm=True):
    """The CPU path: uint8 [B,H,W,3] -> float [B,3,size,size], CLIP-normalised (0..255 with
    norm=False). Each box is cut out on whole pixels (reflected where it leaves the image), resized
    by PyTorch's antialiased bilinear uint8 kernel, mirrored by reversing its columns and converted
    to float while in cache. Image by image: the boxes differ in size, and uint8 is what is fast;
    a batch of crops that need no resize (pad_crop) is one gather instead."""
    u8 = torch.as_tensor(u8)
    B, H, W, _ = u8.shape
    out = torch.empty((B, 3, size, size), dtype=torch.float32)
    px = _pixel_boxes(boxes, H, W)
    if B and (px[:, 2:] == size).all():  # crops without a resize (pad_crop): one batched gather
        return _crop_batch(u8, px, flip, size, out, norm)
    scale, bias = (c[0] for c in _norm_consts('cpu'))
    for i, ((x0, y0, w, h), f) in enumerate(zip(px.tolist(), flip.tolist())):
        if x0 >= 0 and y0 >= 0 and x0 + w <= W and y0 + h <= H:
            crop = u8[i, y0:y0 + h, x0:x0 + w]
        else:
            rows = _reflect(torch.arange(y0, y0 + h), H)
            cols = _reflect(torch.arange(x0, x0 + w), W)
            crop = u8[i][rows[:, None], cols[None, :]]
        crop = crop.permute(2, 0, 1)  # [3, h, w] view, channels-last: the fast kernel's layout
        if (h, w) != (size, size):
            crop = F.interpolate(crop[None], size=(size, size), mode='bilinear', antialias=True,
                                 align_corners=False)[0]
        out[i].copy_(crop.flip(2) if f else crop)
        if norm:
            out[i].mul_(scale).add_(bias)
    return out


def _crop_batch(u8, px, flip, size, out, norm):
    # every box is size x size: the crop, its reflection and the flip are one index map per axis,
    # and the whole batch is one gather (a loop over the images spent most of its time indexing)
    j = torch.arange(size)
    rows = _reflect(px[:, 1:2] + j, u8.shape[1])  # [B, size]
    cols = _reflect(px[:, 0:1] + j, u8.shape[2])
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(len(px))[:, None, None]
    out.copy_(u8[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2))
    if norm:
        scale, bias = _norm_consts('cpu')
        out.mul_(scale).add_(bias)
    return out


def resized_crop(x, boxes, flip, size):
    """The device path: x float [B,C,H,W]; boxes [B,4] (cx, cy, w, h) fractions; flip [B] bool ->
    [B,C,size,size], crop-then-resize (bilinear, align_corners=False) of the whole batch as one
    grid_sample. Output pixel j samples source position x0 + (j + 1/2) w / size - 1/2 (pixel units,
    mirrored when flipped), clamped to the box's outer pixel centres as a resize of the cut-out box
    is; positions outside the image are reflected about its edge pixels (numpy's 'reflect' pad).
    The transform is axis-aligned, so the grid is built from two [B, size] vectors."""
    B, _, H, W = x.shape
    j = torch.arange(size, dtype=torch.float64) + 0.5

    def axis(c, w, n):  # [B] centres and widths (fractions) -> [B, size] normalised positions
        lo, width = (c.double() - w.double() / 2) * n, w.double() * n
        p = lo[:, None] + j * (width / size)[:, None] - 0.5
        p = torch.minimum(torch.maximum(p, lo[:, None]), (lo + width - 1)[:, None])
        return p * (2 / max(n - 1, 1)) - 1  # align_corners=True: +-1 are the edge pixel centres

    gx = axis(boxes[:, 0], boxes[:, 2], W)
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    gy = axis(boxes[:, 1], boxes[:, 3], H)
    gx, gy = gx.to(x.device, x.dtype), gy.to(x.device, x.dtype)
    grid = torch.stack([gx[:, None, :].expand(B, size, size),
                        gy[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=True)


def _norm_consts(device):
    # x / 255 normalised by CLIP mean/std  ==  x * scale + bias
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)
                 for v in (CLIP_MEAN, CLIP_STD))
    return (1 / (255 * std)).float().to(device), (-mean / std).float().to(device)


def normalize(x):
    """float [B,3,H,W] in 0..255 -> CLIP-normalised."""
    scale, bias = _norm_consts(x.device)
    return x.mul(scale).add_(bias)


def resize(x, size):
    """float [B,3,H,W] 0..255 -> [B,3,size,size], bicubic antialiased (no-op at the stored size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    x = F.interpolate(x, size=(size, size), mode='bicubic', antialias=True, align_corners=False)
    return x.clamp_(0, 255)


def to_float(u8, device, norm=True):
    """uint8 numpy/tensor [B,H,W,3] -> float [B,3,H,W] on device (non-blocking from pinned memory),
    CLIP-normalised unless norm=False. In-place ops on one contiguous buffer: on a CPU this is
    several times faster than the out-of-place broadcasting expression."""
    x = torch.as_tensor(u8)
    x = x.to(device, non_blocking=x.is_pinned())
    B, H, W, _ = x.shape
    out = torch.empty((B, 3, H, W), dtype=torch.float32, device=x.device)
    out.copy_(x.permute(0, 3, 1, 2))
    if norm:
        scale, bias = _norm_consts(x.device)
        out.mul_(scale).add_(bias)
    return out


def plain(u8, device, size, norm=True):
    """The evaluation transform: uint8 [B,H,W,3] -> float [B,3,size,size], normalised (unless
    norm=False), resized only if the stored size differs."""
    if u8.shape[1] == size and u8.shape[2] == size:
        return to_float(u8, device, norm)
    x = resize(to_float(u8, device, norm=False), size)
    return normalize(x) if norm else x
