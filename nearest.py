"""
cluster.py's nearest-centre search (k-means' assignment step and the final top-l labels): the
kk largest inner products of each row with the centres, by faiss (on the GPU when faiss has
GPUs) or a torch matmul + top-k on the device. In half precision (search_dtype float16 or
bfloat16) each row's kk + RESCORE best candidates are re-scored in float32 and the kk best of
those kept: the labels are float32's (docs/scale.md, "Half-precision search (`search_dtype`)").
"""
import numpy as np
import torch

try:
    import faiss
except ImportError:  # search='torch' needs no faiss (e.g. a GPU machine without faiss-gpu)
    faiss = None

RESCORE = 8  # extra candidates of a half-precision search, re-scored in float32
LOW = {'float32': None, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
_gpu_res = []  # faiss's GPU resources, made once


def resolve(search, search_dtype, device):
    """(search, search_dtype, faiss on a GPU?) with 'auto' resolved: faiss, unless it is not
    installed or has no GPUs on a CUDA device (then torch); float16 on CUDA, float32 on CPUs.
    Stops with one line on a setting this machine cannot run."""
    if search == 'auto':
        search = ('torch' if faiss is None or device.startswith('cuda') and faiss.get_num_gpus() == 0
                  else 'faiss')
    if search not in ('faiss', 'torch'):
        raise SystemExit(f"cluster.py: search={search!r} must be 'auto', 'faiss' or 'torch'")
    if search == 'faiss' and faiss is None:
        raise SystemExit('cluster.py: search=faiss but faiss is not installed (pip install faiss-cpu); '
                         'search=torch needs no faiss')
    gpu = search == 'faiss' and device.startswith('cuda') and faiss.get_num_gpus() > 0
    if search_dtype == 'auto':
        search_dtype = 'float16' if device.startswith('cuda') else 'float32'
    if search_dtype not in LOW:
        raise SystemExit(f"cluster.py: search_dtype={search_dtype!r} must be 'auto', 'float32', "
                         "'float16' or 'bfloat16'")
    if gpu and search_dtype == 'bfloat16':
        raise SystemExit('cluster.py: faiss on GPUs searches in float32 or float16, not bfloat16; '
                         'search_dtype=float16, or search=torch')
    return search, search_dtype, gpu


def searcher(cen, device, search, search_dtype, gpu=False):
    """f(x float16 [m, d] numpy, kk) -> (scores, ids) of the kk largest inner products with the
    centres cen (float32 [k, d] numpy), sorted, as torch tensors on `device`; gpu: faiss on this
    rank's GPU (resolve's third value)."""
    (k, d), low = cen.shape, LOW[search_dtype]
    C = torch.from_numpy(cen).to(device)
    kc = lambda kk: kk if low is None else min(k, kk + RESCORE)  # noqa: E731
    if search == 'torch':
        Ch = C if low is None else C.to(low)

        def find(x, kk):
            return torch.topk(torch.from_numpy(x).to(device).to(Ch.dtype) @ Ch.T, kc(kk))
    else:
        index = faiss.IndexFlatIP(d) if low is None else faiss.IndexScalarQuantizer(
            d, getattr(faiss.ScalarQuantizer, 'QT_fp16' if low == torch.float16 else 'QT_bf16'),
            faiss.METRIC_INNER_PRODUCT)
        if gpu:
            _gpu_res[:] = _gpu_res or [faiss.StandardGpuResources()]
            if low is None:
                index = faiss.index_cpu_to_gpu(_gpu_res[0], torch.cuda.current_device(), index)
            else:  # float16 storage and GEMM on the GPU
                cfg = faiss.GpuIndexFlatConfig()
                cfg.device, cfg.useFloat16 = torch.cuda.current_device(), True
                index = faiss.GpuIndexFlatIP(_gpu_res[0], d, cfg)
        index.train(cen)  # a no-op for a flat index; a float16 / bfloat16 one records its type
        index.add(cen)

        def find(x, kk):
            D, I = index.search(x.astype(np.float32), kc(kk))
            return torch.from_numpy(D).to(device), torch.from_numpy(I).to(device)

    def f(x, kk):
        D, I = find(x, kk)
        if low is None:
            return D, I
        return rescore(torch.from_numpy(x).to(device), I, C, kk)
    return f


def rescore(x, I, C, kk):
    """The kk best of each row's candidates I [m, c] by their float32 inner products with x, sorted;
    in blocks of rows that keep the gathered candidate centres [rows, c, d] near 64 MiB."""
    D, J = [], []
    step = max(1, (1 << 24) // (I.shape[1] * C.shape[1]))
    for i in range(0, len(x), step):
        cand = I[i:i + step]
        s = torch.bmm(C[cand], x[i:i + step].float()[:, :, None])[:, :, 0]  # [rows, c] float32
        top, j = torch.topk(s, kk)
        D.append(top)
        J.append(cand.gather(1, j))
    return torch.cat(D), torch.cat(J)
