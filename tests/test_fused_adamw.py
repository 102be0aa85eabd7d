"""stronghold_ext.adamw_step (C++ kernel and torch fallback) against torch.optim.AdamW(fused=True) on CPU.

The fp32 layout (fp32 master and moments) is checked against torch's optimizer; the other layouts
(bf16 moments, remainder master) bit for bit against the fallback, the fallback against a float64
model of its roundings, and the remainder master against the fp32 master run side by side.

The kernel is compiled once per machine (cached, see stronghold_ext.build_directory); when it does
not build here its tests skip with the reason and the fallback tests still run.
"""
import pytest
import torch

import stronghold_ext
from stronghold_ext.remainders import join_master, split_master

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


# ----- the other host-store layouts: bf16 moments, remainder master -----

F32, BF16 = torch.float32, torch.bfloat16
GROUPS = ((0, CUT, WD), (CUT, N, 0.0))  # decay group, then no-decay group (starts unaligned)
GRAD_SCALES = (0.37, 1.0, 2.0 ** -10, 0.37, 0.37)  # per step: 1.0 takes the fallback's no-copy path


def tie_start(seed=0):
    """Start masters with exact ties (a low half of exactly 0x8000), and the indices kept at zero gradient.

    1% of the elements get a low half of 0x8000 under their random high half, so about half of them
    round up (listed ties) and half down (the code 0x8000 read as +0x8000); the groups' and the
    first tile's edges are listed ties. `made`: decay-group masters p0 whose p0 * (1 - lr * wd) in
    fp32 is an exact tie; with zero gradient and moments the first step gives exactly that value,
    so ties appear during the step (and leave at the next). `kept`: no-decay ties with zero
    gradient, which no step moves.
    """
    gen = torch.Generator().manual_seed(seed)
    master = torch.randn(N, generator=gen) * 0.05
    bits = master.view(torch.int32)
    idx = torch.randperm(N, generator=gen)[:N // 100]
    bits[idx] = (bits[idx] & ~0xFFFF) | 0x8000
    edges = torch.tensor([0, 1023, 1024, CUT - 1, CUT, N - 1])
    bits[edges] = (bits[edges] & ~0x1FFFF) | 0x18000

    decay = torch.tensor(1 - LR * WD, dtype=F32)  # as the kernel forms it: in double, then float
    high = torch.randint(0x3C00, 0x3D80, (4000,), generator=gen, dtype=torch.int32)
    high |= torch.randint(0, 2, (4000,), generator=gen, dtype=torch.int32) << 15  # sign
    target = ((high << 16) | 0x8000).view(F32)
    p0 = target / decay
    p0 = p0[(p0 * decay).view(torch.int32) == target.view(torch.int32)][:64]
    made = torch.arange(64) * 37 + 100
    master[made] = p0
    kept = torch.arange(64) * 41 + CUT + 500
    bits[kept] = (bits[kept] & ~0xFFFF) | 0x8000
    return master, torch.cat([made, kept]), made


class HostState:
    """One layer's host state in a given layout, stepped group by group through views at odd offsets
    of larger buffers (as a HostLayer's flat buffer)."""

    def __init__(self, master, remainders, moments, out_dtype=BF16):
        def buf(dtype):
            return torch.zeros(N + 8, dtype=dtype)[3:N + 3]
        self.master = None if remainders else buf(F32).copy_(master)
        self.remainder, self.ties = None, [None, None]
        if remainders:
            weights, remainder, ties = split_master(master)
            self.weights, self.remainder = buf(BF16).copy_(weights), buf(torch.int16).copy_(remainder)
            self.ties = [ties[(ties >= a) & (ties < b)] - a for a, b, _ in GROUPS]
        else:
            self.weights = buf(out_dtype).copy_(master) if out_dtype is not None else None
        self.exp_avg, self.exp_avg_sq = buf(moments[0]), buf(moments[1])

    def step(self, fn, grad, t, grad_scale, betas=BETAS):
        for k, (a, b, wd) in enumerate(GROUPS):
            ties = fn(None if self.master is None else self.master[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b],
                      grad[a:b], None if self.weights is None else self.weights[a:b], LR, betas[0], betas[1], EPS,
                      wd, t, grad_scale, remainder=None if self.remainder is None else self.remainder[a:b],
                      ties=self.ties[k])
            if self.remainder is None:
                assert ties is None
            else:
                assert ties.dtype == torch.int64 and ties.dim() == 1
                self.ties[k] = ties

    def all_ties(self):
        return torch.cat([t + a for t, (a, _, _) in zip(self.ties, GROUPS)])

    def fp32_master(self):
        if self.master is not None:
            return self.master
        return join_master(self.weights, self.remainder, self.all_ties())

    def tensors(self):
        return {"master": self.master, "weights": self.weights, "remainder": self.remainder,
                "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


def gradient(gen, grad_dtype, zero):
    g = torch.randn(N, generator=gen) * 10 ** (torch.rand(N, generator=gen) * 6 - 5)
    g[zero] = 0.0
    return g.to(grad_dtype)


def kernel_fn(ext):
    return lambda *args, **kwargs: ext.adamw_step(*args, **kwargs)


def fallback_fn(scratch):
    return lambda *args, **kwargs: stronghold_ext.adamw_step_torch(*args, scratch=scratch, **kwargs)


def as_bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(got: HostState, want: HostState, what):
    for name, a in got.tensors().items():
        b = want.tensors()[name]
        assert (a is None) == (b is None), name
        if a is not None:
            diff = (as_bits(a) != as_bits(b)).nonzero().flatten()
            assert diff.numel() == 0, f"{what}: {name} differs at {diff[:8].tolist()} ({diff.numel()} elements)"
    for k, (a, b) in enumerate(zip(got.ties, want.ties)):
        assert (a is None and b is None) or torch.equal(a, b), f"{what}: ties of group {k}: {a} != {b}"


OTHER_LAYOUTS = [(rem, moments, grad, BF16) for rem in (False, True)
                 for moments in ((F32, BF16), (BF16, F32), (BF16, BF16)) for grad in (F32, BF16)] + \
                [(True, (F32, F32), grad, BF16) for grad in (F32, BF16)] + \
                [(False, (BF16, BF16), torch.float16, torch.float16), (False, (BF16, F32), BF16, None)]


def layout_id(case):
    remainders, moments, grad, out = case
    name = {F32: "f32", BF16: "bf16", torch.float16: "f16", None: "none"}
    return "{}-m{}-v{}-grad{}-out{}".format("remainder" if remainders else "master",
                                            *(name[x] for x in (*moments, grad, out)))


@pytest.mark.parametrize("remainders,moments,grad_dtype,out_dtype", OTHER_LAYOUTS,
                         ids=[layout_id(case) for case in OTHER_LAYOUTS])
def test_kernel_matches_fallback_bitwise(ext, remainders, moments, grad_dtype, out_dtype):
    """Every bit of master or weights + remainder + ties, and of the moments, after 5 steps (two groups
    at odd offsets, grad_scale != 1, ties at entry and made during the steps)."""
    master, zero, made = tie_start()
    kernel = HostState(master, remainders, moments, out_dtype)
    fallback = HostState(master, remainders, moments, out_dtype)
    scratch = torch.empty(2 * N)
    gen = torch.Generator().manual_seed(1)
    if remainders:
        assert kernel.all_ties().numel() > 100  # listed ties at entry
    for t, scale in enumerate(GRAD_SCALES, 1):
        grad = gradient(gen, grad_dtype, zero)
        kernel.step(kernel_fn(ext), grad, t, scale)
        fallback.step(fallback_fn(scratch if t % 2 else None), grad, t, scale)
        assert_same_bits(kernel, fallback, f"step {t}")
        if remainders and t == 1:  # the ties made by the step: listed where they rounded up (odd high half)
            p1 = master[made] * torch.tensor(1 - LR * WD, dtype=F32)
            up = (p1.view(torch.int32) >> 16) & 1 == 1
            assert up.sum() >= 10 and (~up).sum() >= 10
            assert torch.isin(made[up], kernel.ties[0]).all() and not torch.isin(made[~up], kernel.ties[0]).any()


@pytest.mark.parametrize("moments", [(F32, F32), (BF16, BF16), (F32, BF16)], ids=["f32", "bf16", "f32-bf16"])
@pytest.mark.parametrize("impl", ["kernel", "fallback"])
def test_remainders_change_no_bit(request, impl, moments):
    """The key property: after every step the remainder layout's master (joined from weights, remainder
    and ties) is bit for bit the fp32-master layout's, its weights are that layout's weights_out, its
    ties are split_master's, and the moments agree. The fallback's fp32-master layout with fp32
    moments is torch's own call (whose scalar tail may differ by an ulp), so it is compared against
    the kernel's when the kernel is there."""
    ext = request.getfixturevalue("ext") if impl == "kernel" or moments == (F32, F32) else None
    fn = kernel_fn(ext) if impl == "kernel" else fallback_fn(None)
    reference_fn = kernel_fn(ext) if moments == (F32, F32) else fn
    master, zero, made = tie_start(seed=2)
    rem = HostState(master, True, moments)
    fp32 = HostState(master, False, moments)
    gen = torch.Generator().manual_seed(3)
    for t, scale in enumerate(GRAD_SCALES, 1):
        grad = gradient(gen, BF16, zero)
        rem.step(fn, grad, t, scale, betas=(0.3, 0.999) if t == 4 else BETAS)
        fp32.step(reference_fn, grad, t, scale, betas=(0.3, 0.999) if t == 4 else BETAS)
        joined = rem.fp32_master()
        assert torch.equal(as_bits(joined), as_bits(fp32.master)), f"step {t}: master"
        assert torch.equal(as_bits(rem.weights), as_bits(fp32.weights)), f"step {t}: weights"
        for k, (a, b, _) in enumerate(GROUPS):
            assert torch.equal(rem.ties[k], split_master(fp32.master[a:b])[2]), f"step {t}: ties of group {k}"
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(as_bits(getattr(rem, name)), as_bits(getattr(fp32, name))), f"step {t}: {name}"
        if t == 1:
            assert torch.isin(made, rem.ties[0]).any(), "no tie was made by the first step"
    assert torch.isin(zero[64:], rem.all_ties()).any(), "no tie was kept through the steps"


def bf16_interval(x64, err):
    """The bf16 values that x64 +- err can round to (fp32 then bf16, both to nearest even: monotone)."""
    return (x64 - err).float().bfloat16().float(), (x64 + err).float().bfloat16().float()


@pytest.mark.parametrize("betas", [BETAS, (0.3, 0.999)], ids=["beta1=0.9", "beta1=0.3"])
@pytest.mark.parametrize("impl", ["fallback", "kernel"])
def test_bf16_moments_match_float64_model(request, impl, betas):
    """One step from nonzero bf16 moments, against a float64 model of the fp32 arithmetic.

    The fp32 update of m is fma(coeff, g - m0, base), two roundings (u = 2**-24 relative each), so
    |m32 - M| <= u * (|coeff * (g - m0)| * (1 + u) + |M|) for M = coeff * (g - m0) + base in float64
    (its own error, ~2**-53, covered by the slack). That of v is fma(c2 * g, g, v0 * beta2) with
    three roundings of nonnegative terms, so |v32 - V| <= 3u * V. Rounding to fp32 and then bf16 is
    monotone, so the stored bf16 must lie in [bf16(M - E), bf16(M + E)]; for almost every element
    both ends are one value, which the store must equal (truncation, say, would not), and the widen
    of the stored m0 and v0 must be exact for the model to hold.
    """
    fn = kernel_fn(request.getfixturevalue("ext")) if impl == "kernel" else fallback_fn(None)
    gen = torch.Generator().manual_seed(4)
    n = 100_003
    g = (torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 6 - 5)).bfloat16()
    m0 = (torch.randn(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 6 - 5)).bfloat16()
    v0 = (torch.rand(n, generator=gen) * 10 ** (torch.rand(n, generator=gen) * 10 - 10)).bfloat16()
    m, v = torch.zeros(n + 5, dtype=BF16)[5:].copy_(m0), torch.zeros(n + 1, dtype=BF16)[1:].copy_(v0)
    scale = 0.37
    fn(torch.randn(n, generator=gen), m, v, g, None, LR, betas[0], betas[1], EPS, WD, 3, scale)

    u = 2.0 ** -24
    g32 = (g.float() * scale).double()  # the fp32 gradient the step uses (an fp32 multiply)
    w = float(torch.tensor(1 - betas[0], dtype=F32))
    coeff = w if abs(w) < 0.5 else float(torch.tensor(w, dtype=F32) - 1.0)
    base = m0.double() if abs(w) < 0.5 else g32
    d = g32 - m0.double()
    big_m = coeff * d + base
    err_m = (u * ((coeff * d).abs() * (1 + u) + big_m.abs()) + 2.0 ** -50 * ((coeff * d).abs() + base.abs())
             + 2.0 ** -148)
    c2 = float(torch.tensor(1 - betas[1], dtype=F32))
    beta2 = float(torch.tensor(betas[1], dtype=F32))
    big_v = c2 * g32 * g32 + v0.double() * beta2
    err_v = 3.0001 * u * big_v + 2.0 ** -148

    for name, got, x64, err in (("exp_avg", m, big_m, err_m), ("exp_avg_sq", v, big_v, err_v)):
        lo, hi = bf16_interval(x64, err)
        stored = got.float()
        assert bool(((stored >= lo) & (stored <= hi)).all()), name
        pinned = lo == hi
        assert pinned.float().mean() > 0.99, name
        truncated = (x64.float().view(torch.int32) & ~0xFFFF).view(F32)
        assert (pinned & (stored != truncated)).float().mean() > 0.3, name  # the check can tell RNE from truncation


def test_kernel_layout_conversions(ext):
    """The 16-bit parts of the other layouts, value by value: bf16 moments store what the fp32 moments
    hold rounded to nearest even (NaN -> 0x7FC0, overflow to inf, denormals rounded, not flushed),
    every finite bf16 moment widens exactly, and a remainder master of any finite value (denormals,
    exact ties listed or not, infinities) is joined and split back exactly."""
    gen = torch.Generator().manual_seed(5)
    specials = torch.tensor([0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000, 0x7F7F8000,
                             0x7F7F7FFF, 0x7F7FFFFF, 0xFF7F8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001,
                             0x7FA00000, 0x3F808000, 0x3F818000, 0x3F817FFF], dtype=torch.int64).to(torch.int32)
    rand = torch.randint(-2 ** 31, 2 ** 31, (60_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    rand[::7] = (rand[::7] & ~0xFFFF) | 0x8000  # rounding ties
    rand[1::7] &= 0x807FFFFF  # denormals
    g = torch.cat([specials, rand]).view(F32)[1:]  # odd start: unaligned
    n = g.numel()

    def step(m, v, grad, beta1, master=None):
        p = torch.zeros(n) if master is None else master
        ext.adamw_step(p, m, v, grad, None, 0.0, beta1, 0.999, 1e-8, 0.0, 1, 1.0)

    # beta1 = 0: exp_avg = fma(0, g - m, g) = g (NaN where g is +-inf); exp_avg_sq = (1 - beta2) * g * g
    m32, v32, m16, v16 = torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=BF16), torch.zeros(n, dtype=BF16)
    step(m32, v32, g, 0.0)
    step(m16, v16, g, 0.0)
    for name, wide, narrow in (("exp_avg", m32, m16), ("exp_avg_sq", v32, v16)):
        nan = torch.tensor(0x7FC0, dtype=torch.int16)
        want = torch.where(torch.isnan(wide), nan, wide.bfloat16().view(torch.int16))
        assert torch.equal(narrow.view(torch.int16), want), name
        assert torch.isnan(wide).any() and (wide.abs() < 2.0 ** -126).logical_and(wide != 0).any()

    # beta1 = 1: exp_avg = fma(0, g - m, m) = m: every finite bf16 value widens and narrows back unchanged
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(BF16)
    every = every[torch.isfinite(every)][3:]
    k = every.numel()
    m = every.clone()
    ext.adamw_step(torch.zeros(k), m, torch.zeros(k, dtype=BF16), torch.zeros(k, dtype=BF16), None,
                   0.0, 1.0, 0.999, 1e-8, 0.0, 1, 1.0)
    assert torch.equal(m.view(torch.int16), every.view(torch.int16))

    # lr = 0: the master is unchanged, so weights, remainder and ties come back as split_master made them
    finite = g[torch.isfinite(g)]
    weights, remainder, ties = split_master(finite)
    assert ties.numel() > 100 and (remainder == -0x8000).sum() > ties.numel()  # both kinds of exact tie
    w, r = weights.clone(), remainder.clone()
    z = torch.zeros(finite.numel(), dtype=BF16)
    got = ext.adamw_step(None, torch.zeros(finite.numel()), z, z, w, 0.0, 0.9, 0.999, 1e-8, 0.1, 1, 1.0,
                         remainder=r, ties=ties)
    assert torch.equal(w.view(torch.int16), weights.view(torch.int16))
    assert torch.equal(r, remainder) and torch.equal(got, ties)
    assert torch.equal(join_master(w, r, got).view(torch.int32), finite.view(torch.int32))


def test_bad_layout_arguments_are_rejected():
    n = 16
    w, r, t = torch.zeros(n, dtype=BF16), torch.zeros(n, dtype=torch.int16), torch.zeros(0, dtype=torch.int64)
    m, v, g = torch.zeros(n), torch.zeros(n, dtype=BF16), torch.zeros(n, dtype=BF16)
    step = stronghold_ext.adamw_step
    args = (1e-3, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)
    cases = [
        ("bf16 weights_out", (None, m, v, g, w.half()), dict(remainder=r, ties=t)),
        ("bf16 weights_out", (None, m, v, g, None), dict(remainder=r, ties=t)),
        ("master must be None", (torch.zeros(n), m, v, g, w), dict(remainder=r, ties=t)),
        ("master is None", (None, m, v, g, w), {}),
        ("ties", (torch.zeros(n), m, v, g, w), dict(ties=t)),
        ("ties", (None, m, v, g, w), dict(remainder=r)),
        ("sorted", (None, m, v, g, w), dict(remainder=r, ties=torch.tensor([3, 2]))),
        ("sorted", (None, m, v, g, w), dict(remainder=r, ties=torch.tensor([n]))),
        ("ties must be", (None, m, v, g, w), dict(remainder=r, ties=t.int())),
        ("remainder", (None, m, v, g, w), dict(remainder=r.int(), ties=t)),
        ("elements", (None, m, v, g, w), dict(remainder=r[:8], ties=t)),
        ("grad", (None, m, v, g.half(), w), dict(remainder=r, ties=t)),
        ("exp_avg", (torch.zeros(n), m.half(), v, g, w), {}),
        ("elements", (torch.zeros(n), m, v[:8], g, w), {}),
    ]
    for match, head, kwargs in cases:
        with pytest.raises(RuntimeError, match=match):
            step(*head, *args, **kwargs)


def test_no_ext_env_other_layouts(monkeypatch):
    """stronghold_ext.adamw_step without the kernel: the fallback takes the other layouts and returns the ties."""
    monkeypatch.setenv("STRONGHOLD_NO_EXT", "1")
    monkeypatch.setattr(stronghold_ext, "_cache", {})
    master, zero, made = tie_start(seed=6)
    rem = HostState(master, True, (BF16, BF16))
    fp32 = HostState(master, False, (BF16, BF16))
    gen = torch.Generator().manual_seed(7)
    for t in (1, 2):
        grad = gradient(gen, BF16, zero)
        rem.step(stronghold_ext.adamw_step, grad, t, 0.5)
        fp32.step(stronghold_ext.adamw_step, grad, t, 0.5)
    assert torch.equal(as_bits(rem.fp32_master()), as_bits(fp32.master))
    assert torch.equal(rem.exp_avg_sq.view(torch.int16), fp32.exp_avg_sq.view(torch.int16))
