"""The GPU hot path (DESIGN.md): no op synchronises the host, every op can be captured in a
CUDA graph. Runs on GPU machines (benchmarks/gpu_check.sh); skips elsewhere."""
import pytest
import torch

import kdops

NUM_CLASSES = 5


def calls(device):
    """{op: a function running the op forward + backward on fixed CUDA inputs}."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(True)

    s, t = leaf(2, 8, 6, 7), leaf(2, 8, 6, 7)
    labels = torch.randint(0, NUM_CLASSES, (2, 6, 7), generator=g).to(device)
    labels[0, 0] = 255
    weight = leaf(NUM_CLASSES, 8)
    protos, counts = kdops.prototype_pool(s.detach(), labels, NUM_CLASSES)
    batch_counts = kdops.prototype_pool(s.detach(), labels, NUM_CLASSES, per_image=False)[1]

    def total(out):
        return out.sum() if isinstance(out, torch.Tensor) else sum(o.float().sum() for o in out if o.is_floating_point())

    ops = {
        "channel_kl": lambda: kdops.channel_kl(s, t, 4.0),
        "pixel_kl": lambda: kdops.pixel_kl(s, t, 1.0),
        "pixel_kl_target": lambda: kdops.pixel_kl(s[:, :NUM_CLASSES], t[:, :NUM_CLASSES], 1.0, labels),
        "attention_map": lambda: kdops.attention_map(s),
        "attention_loss": lambda: kdops.attention_loss(s, t),
        "class_attention_map": lambda: kdops.class_attention_map(s, weight),
        "class_attention_loss": lambda: kdops.class_attention_loss(s, t, weight, weight),
        "prototype_pool": lambda: kdops.prototype_pool(s, labels, NUM_CLASSES)[0],
        "prototype_pool_batch_normalized": lambda: kdops.prototype_pool(
            s, labels, NUM_CLASSES, per_image=False, normalize_features=True)[0],
        "prototype_kl": lambda: kdops.prototype_kl(s, t, protos, protos, counts),
        # APD's chain: batch prototypes of the features themselves, gradients through them.
        "prototype_kl_pooled": lambda: kdops.prototype_kl(
            s, t, kdops.prototype_pool(s, labels, NUM_CLASSES, per_image=False)[0],
            kdops.prototype_pool(t, labels, NUM_CLASSES, per_image=False)[0], batch_counts),
        "class_variation_loss": lambda: kdops.class_variation_loss(s, t, labels, NUM_CLASSES),
        "channel_correlation": lambda: kdops.channel_correlation(s),
        "channel_correlation_loss": lambda: kdops.channel_correlation_loss(s, t),
        "pairwise_affinity_loss": lambda: kdops.pairwise_affinity_loss(s, t),
    }
    return {name: (lambda fn=fn: total(fn()).backward()) for name, fn in ops.items()}


OPS = list(calls("cpu"))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_no_host_sync(op):
    step = calls("cuda")[op]
    step()  # first call: imports, compiles Triton kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("op", OPS)
def test_cuda_graph_capture(op):
    step = calls("cuda")[op]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()


@pytest.mark.parametrize("op", OPS)
def test_the_steps_run_on_cpu(op):
    """The steps above are valid calls (checked here, where the GPU cases skip)."""
    calls("cpu")[op]()
