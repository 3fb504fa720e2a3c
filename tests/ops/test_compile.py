"""Every public op runs under torch.compile(fullgraph=True) — no graph break — forward and
backward, and gives the eager result."""
import pytest
import torch

import kdops

K = 3


def _inputs():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 4, 5, 6, generator=g)
    t = torch.randn(2, 4, 5, 6, generator=g)
    labels = torch.randint(0, K, (2, 5, 6), generator=g)
    labels[0, 0, :3] = 255
    w_s, w_t = torch.randn(K, 4, generator=g), torch.randn(K, 4, generator=g)
    return s, t, labels, w_s, w_t


def _protos(x, labels):
    return kdops.prototype_pool(x, labels, K)


CALLS = [
    pytest.param(lambda s, t, y, ws, wt: kdops.channel_kl(s, t, 2.0), id="channel_kl"),
    pytest.param(lambda s, t, y, ws, wt: kdops.pixel_kl(s, t, 2.0, y), id="pixel_kl"),
    pytest.param(lambda s, t, y, ws, wt: kdops.attention_map(s, size=(3, 4)).square().sum(), id="attention_map"),
    pytest.param(lambda s, t, y, ws, wt: kdops.attention_loss(s, t[..., :3, :4]), id="attention_loss"),
    pytest.param(lambda s, t, y, ws, wt: kdops.class_attention_map(s, ws).sum(), id="class_attention_map"),
    pytest.param(lambda s, t, y, ws, wt: kdops.class_attention_loss(s, t, ws, wt), id="class_attention_loss"),
    pytest.param(lambda s, t, y, ws, wt: _protos(s, y)[0].square().sum(), id="prototype_pool"),
    pytest.param(
        lambda s, t, y, ws, wt: kdops.prototype_kl(s, t, _protos(s, y)[0], _protos(t, y)[0], _protos(s, y)[1]),
        id="prototype_kl",
    ),
    pytest.param(lambda s, t, y, ws, wt: kdops.class_variation_loss(s, t, y, K), id="class_variation_loss"),
    pytest.param(lambda s, t, y, ws, wt: kdops.channel_correlation(s).sum(), id="channel_correlation"),
    pytest.param(lambda s, t, y, ws, wt: kdops.channel_correlation_loss(s, t), id="channel_correlation_loss"),
    pytest.param(lambda s, t, y, ws, wt: kdops.pairwise_affinity_loss(s, t), id="pairwise_affinity_loss"),
]


@pytest.mark.parametrize("call", CALLS)
def test_fullgraph_compile_matches_eager(call):
    torch._dynamo.reset()
    s, t, labels, w_s, w_t = _inputs()
    s_eager = s.clone().requires_grad_(True)
    eager = call(s_eager, t, labels, w_s, w_t)
    eager.backward()

    s_compiled = s.clone().requires_grad_(True)
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(s_compiled, t, labels, w_s, w_t)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_compiled.grad, s_eager.grad, rtol=1e-5, atol=1e-7)
