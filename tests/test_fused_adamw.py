"""stronghold_ext.adamw_step (C++ kernel and torch fallback) against torch.optim.AdamW(fused=True) on CPU.

The kernel is compiled once per machine (cached, see stronghold_ext.build_directory); when it does
not build here its tests skip with the reason and the fallback tests still run.
"""
import pytest
import torch

import stronghold_ext

pytestmark = pytest.mark.unit

N, CUT = 100_003, 60_001  # odd sizes; the no-decay group starts unaligned (heads and tails)
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1


@pytest.fixture(scope="module")
def ext():
    module = stronghold_ext.fused_adamw()
    if module is None:
        pytest.skip("stronghold_ext kernel unavailable: "
                    + stronghold_ext.load_errors.get("stronghold_fused_adamw", "?"))
    return module


def kernel_step(ext):
    def step(*args):
        ext.adamw_step(*args)
    return step


def fallback_step(scratch):
    def step(*args):
        stronghold_ext.adamw_step_torch(*args, scratch=scratch)
    return step


def run_both(step_fn, grad_dtype, grad_scale, steps=5, betas=BETAS, seed=0, out_dtype=torch.bfloat16):
    """HostLayer-like flat buffer, two groups (decay / no-decay), `steps` steps with both paths."""
    gen = torch.Generator().manual_seed(seed)
    master = torch.randn(N, generator=gen) * 0.05
    ref = master.clone()
    ref_views = [ref[:CUT], ref[CUT:]]
    opt = torch.optim.AdamW([{"params": [ref_views[0]], "weight_decay": WD},
                             {"params": [ref_views[1]], "weight_decay": 0.0}],
                            lr=LR, betas=betas, eps=EPS, fused=True)
    exp_avg, exp_avg_sq = torch.zeros(N), torch.zeros(N)
    weights = torch.empty(N, dtype=out_dtype) if out_dtype is not None else None
    for t in range(1, steps + 1):
        # gradients over several orders of magnitude, as real ones
        grad = (torch.randn(N, generator=gen) * 10 ** (torch.rand(N, generator=gen) * 6 - 5)).to(grad_dtype)
        grad_before = grad.clone()
        g32 = grad.float() * grad_scale  # how the host store unscales today: in fp32
        for view, a, b in ((ref_views[0], 0, CUT), (ref_views[1], CUT, N)):
            view.grad = g32[a:b]
        opt.step()
        for (a, b), wd in (((0, CUT), WD), ((CUT, N), 0.0)):
            step_fn(master[a:b], exp_avg[a:b], exp_avg_sq[a:b], grad[a:b],
                    None if weights is None else weights[a:b], LR, betas[0], betas[1], EPS, wd, t, grad_scale)
        assert torch.equal(grad, grad_before), "grad must not be modified"
    state = [opt.state[v] for v in ref_views]
    ref_m = torch.cat([s["exp_avg"] for s in state])
    ref_v = torch.cat([s["exp_avg_sq"] for s in state])
    return (master, exp_avg, exp_avg_sq, weights), (ref, ref_m, ref_v)


def check(got, ref, out_dtype=torch.bfloat16):
    (master, m, v, weights), (ref_p, ref_m, ref_v) = got, ref
    for name, a, b in (("master", master, ref_p), ("exp_avg", m, ref_m), ("exp_avg_sq", v, ref_v)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12, msg=lambda s: f"{name}: {s}")
        # Bitwise on this build of torch (all but torch's scalar tails); exp_avg_sq is left to rtol:
        # whether torch's compiler fused beta2 * v + (1 - beta2) * g * g into an fma is its build's choice.
        same = (a == b).float().mean().item()
        assert name == "exp_avg_sq" or same > 0.99, f"{name}: only {same:.5f} of the elements equal torch's"
    if weights is not None:
        assert torch.equal(weights, master.to(out_dtype)), "weights_out != master.to(dtype)"
        assert (weights == ref_p.to(out_dtype)).float().mean().item() > 0.999


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_torch_fused_adamw(ext, grad_dtype):
    check(*run_both(kernel_step(ext), grad_dtype, grad_scale=0.37))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_fallback_matches_torch_fused_adamw(grad_dtype):
    check(*run_both(fallback_step(torch.empty(N)), grad_dtype, grad_scale=0.37))
    check(*run_both(fallback_step(None), grad_dtype, grad_scale=1.0, steps=2))


def test_kernel_other_cases(ext):
    # fp32 training: fp32 grad, no weights copy; beta1 <= 0.5 takes the other side of torch's lerp
    check(*run_both(kernel_step(ext), torch.float32, grad_scale=1.0, out_dtype=None))
    check(*run_both(kernel_step(ext), torch.bfloat16, grad_scale=2.0 ** -10, betas=(0.3, 0.999), steps=3))
    check(*run_both(kernel_step(ext), torch.float16, grad_scale=0.5, out_dtype=torch.float16, steps=2),
          out_dtype=torch.float16)


def test_kernel_conversions(ext):
    """Every finite fp16 gradient value widens exactly; bf16/fp16 weights round like Tensor.to()."""
    half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    half = half[torch.isfinite(half)][3:]  # odd start: unaligned
    n = half.numel()
    m = torch.full((n,), 7.0)
    # beta1 = 0: exp_avg = fma(0, g - m, g) = g exactly; lr = 0 leaves master alone
    ext.adamw_step(torch.zeros(n), m, torch.zeros(n), half, None, 0.0, 0.0, 0.999, 1e-8, 0.0, 1, 1.0)
    assert torch.equal(m, half.float())

    gen = torch.Generator().manual_seed(1)
    vals = torch.cat([torch.randn(50_000, generator=gen) * 10 ** torch.randint(-45, 39, (50_000,), generator=gen),
                      torch.tensor([0.0, 1.0, -1.0, 65504.0, 65520.0, 70000.0, 1e-8, -6e-8, 3e38, 1.1754942e-38,
                                    1e-40, float("inf"), -float("inf")])]).float()
    vals = vals[torch.isfinite(vals) | torch.isinf(vals)]
    for dtype in (torch.bfloat16, torch.float16):
        p = vals.clone()
        w = torch.empty(p.numel(), dtype=dtype)
        ext.adamw_step(p, torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p), w,
                       0.0, 0.9, 0.999, 1e-8, 0.0, 1, 1.0)
        assert torch.equal(p, vals)
        assert torch.equal(w, vals.to(dtype)), dtype


def test_bad_arguments_are_rejected_before_the_kernel(ext):
    a = torch.zeros(16)
    step = stronghold_ext.adamw_step
    with pytest.raises(RuntimeError, match="master"):
        step(a.double(), a, a, a, None, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)
    with pytest.raises(RuntimeError, match="elements"):
        step(a, a.clone(), a.clone(), torch.zeros(15), None, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)
    with pytest.raises(RuntimeError, match="weights_out"):
        step(a, a.clone(), a.clone(), a.clone(), torch.zeros(16), 1e-3, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        step(torch.zeros(32)[::2], a, a.clone(), a.clone(), None, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)
    with pytest.raises(RuntimeError, match="step"):
        step(a, a.clone(), a.clone(), a.clone(), None, 1e-3, 0.9, 0.95, 1e-8, 0.0, 0, 1.0)


def test_no_ext_env_selects_fallback(monkeypatch):
    monkeypatch.setenv("STRONGHOLD_NO_EXT", "1")
    monkeypatch.setattr(stronghold_ext, "_cache", {})
    assert stronghold_ext.fused_adamw() is None
    assert "STRONGHOLD_NO_EXT" in stronghold_ext.load_errors["stronghold_fused_adamw"]
    (master, m, v, w), (ref_p, ref_m, ref_v) = run_both(stronghold_ext.adamw_step, torch.bfloat16, 0.5, steps=2)
    assert torch.equal(master, ref_p) and torch.equal(w, master.bfloat16())
