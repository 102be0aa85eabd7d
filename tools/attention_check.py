"""torch's attention kernels on this machine against fp32 attention, at the fine-tuning run's shapes.

Each backend torch has (cuDNN, flash, memory-efficient, math) and torch's own choice ("torch: NAME"), for one causal
sequence (model.attend's padded and pre-training path) and for packed conversations (a boolean mask),
with the inputs as permuted views of megatron-core's [s, b, heads, dim] and as contiguous copies, with
and without autograd: the largest difference of the output, and of the three input gradients, from the
same attention in fp32 over the tokens each token may see; "-" where a backend cannot run the case.
model.attend takes torch's choice; this table tells a kernel's error on a card from the rest of the step.

    python tools/attention_check.py [--seq 2048 --batch 2 --heads 32 --groups 8 --dim 128]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"torch": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def reference(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def chosen(q, k, v, mask) -> str:
    """The backend torch picks for these inputs under its default order."""
    try:
        return SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, mask is None)).name.lower().removesuffix(
            "_attention")
    except Exception:  # a private function: its name or signature may change
        return "?"


def check(ns, device, dtype) -> list:
    """(mask, backend, inputs, autograd, [output error, d query, d key, d value errors] or None)."""
    from megatron.stronghold.model import conversation_mask

    s, b, heads, groups, dim = ns.seq, ns.batch, ns.heads, ns.groups, ns.dim
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    # megatron-core's layout, keys and values expanded to every head as model.attend does
    query, key, value = randn(s, b, heads, dim), randn(s, b, groups, dim), randn(s, b, groups, dim)
    key, value = (t.repeat_interleave(heads // groups, dim=2) for t in (key, value))
    grad_out = randn(b, heads, s, dim)
    rows = []
    for name, segments in (("one causal sequence", None),
                           ("packed conversations", (torch.arange(s, device=device) // max(1, s // 3)).expand(b, s))):
        allowed = conversation_mask(segments if segments is not None else torch.zeros(b, s, dtype=torch.long,
                                                                                     device=device))
        mask = None if segments is None else allowed
        leaves = [t.permute(1, 2, 0, 3).float().requires_grad_() for t in (query, key, value)]
        expected = reference(*leaves, allowed)
        expected_grads = torch.autograd.grad(expected, leaves, grad_out.float())
        for label, backend in BACKENDS.items():
            for layout in ("permuted views", "contiguous"):
                for grad in (False, True):
                    inputs = [t.detach().requires_grad_(grad) for t in (query, key, value)]
                    q, k, v = (t.permute(1, 2, 0, 3) for t in inputs)
                    if layout == "contiguous":
                        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
                    which = f"torch: {chosen(q, k, v, mask)}" if backend is None else label
                    try:
                        with torch.set_grad_enabled(grad), sdpa_kernel([backend] if backend else list(BACKENDS.values())[1:]):
                            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
                            got = torch.autograd.grad(out, inputs, grad_out) if grad else []
                    except RuntimeError:  # this backend cannot run the case (hardware, mask, dtype)
                        rows.append((name, which, layout, grad, None))
                        continue
                    errors = [(out.float() - expected).abs().max().item()]
                    errors += [(g.permute(1, 2, 0, 3).float() - e).abs().max().item()
                               for g, e in zip(got, expected_grads)]
                    rows.append((name, which, layout, grad, errors))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    ns = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    card = torch.cuda.get_device_name() if cuda else "cpu"
    cudnn = torch.backends.cudnn.version() if cuda else None
    print(f"attention kernels on {card}, torch {torch.__version__}, cuDNN {cudnn}, {str(dtype).removeprefix('torch.')}, "
          f"[s, b, heads, groups, dim] = [{ns.seq}, {ns.batch}, {ns.heads}, {ns.groups}, {ns.dim}]: largest "
          "difference from fp32 attention")
    print(f"{'mask':<22}{'backend':<18}{'inputs':<16}{'autograd':<10}{'output':>10}{'d query':>10}{'d key':>10}"
          f"{'d value':>10}")
    for name, which, layout, grad, errors in check(ns, device, dtype):
        cells = "".join(f"{e:>10.2e}" for e in errors) if errors is not None else f"{'-':>10}"
        print(f"{name:<22}{which:<18}{layout:<16}{'on' if grad else 'off':<10}{cells}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
