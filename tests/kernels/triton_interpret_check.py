"""Run with TRITON_INTERPRET=1 (set before triton is imported): the Triton loss kernels, run by
Triton's interpreter on CPU tensors, equal the torch chunk functions, and nbdiff_linear_loss under
NBDIFF_LOSS_BACKEND=triton equals the torch backend in values and gradients.

Prints one ``ok ...`` line per check; test_ce_chunk.py runs it in a subprocess.
"""

from __future__ import annotations

import os

import torch

from nbdiff_megatron.kernels import _triton_ce, ce_chunk, nbdiff_linear_loss
from nbdiff_megatron.method.noise import mask_tokens

RTOL = 1e-5


def _chunk(gen: torch.Generator, rows: int, cols: int, row_stride: int):
    # A slice of a wider buffer: the kernels must honour the row stride.
    logits = (torch.randn(rows, row_stride, generator=gen) * 4)[:, :cols]
    target = torch.randint(0, cols, (rows,), generator=gen)
    here = torch.rand(rows, generator=gen) > 0.3
    here[0], here[-1] = True, False  # both kinds of row in every case
    return logits, target, here


def check_kernels() -> None:
    gen = torch.Generator().manual_seed(0)
    # (rows, V_local, row stride, block, splits): ragged last blocks, non-power-of-two V_local,
    # one column, more splits than blocks, the default block (one masked block per row).
    cases = [
        (6, 37, 37, 8, None),
        (5, 37, 41, 8, 3),
        (4, 100, 100, 16, 4),
        (3, 1, 1, 8, None),
        (2, 5, 5, 8, 9),
        (4, 1000, 1003, None, 2),
    ]
    for rows, cols, stride, block, splits in cases:
        logits, target, here = _chunk(gen, rows, cols, stride)
        size = {} if block is None else {"block": block}
        expected = ce_chunk.chunk_stats(logits.clone(), target, here)
        got = _triton_ce.chunk_stats(logits, target, here, splits=splits, **size)
        for name, a, b in zip(("row_max", "sum_exp", "target_logit"), got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=0, msg=f"{name} {rows}x{cols}")
        assert torch.all(got[2][~here] == 0)
        lse = expected[0] + expected[1].log()
        grad_ce = torch.rand(rows, generator=gen) + 0.1
        want = ce_chunk.chunk_grad_(logits.clone(), lse, target, here, grad_ce)
        buf = logits.clone()  # keeps the row stride of the wider buffer
        out = _triton_ce.chunk_grad_(buf, lse, target, here, grad_ce, **size)
        assert out.data_ptr() == buf.data_ptr(), "chunk_grad_ must work in place"
        torch.testing.assert_close(buf, want, rtol=RTOL, atol=1e-7)
    # Extreme but finite logits: a first block far below the rest, huge spreads. No inf / NaN.
    logits, target, here = _chunk(gen, 4, 40, 40)
    logits[:, :8] = -1e30
    logits[1] *= 1e4
    logits[2, 20:] = -3e38
    expected = ce_chunk.chunk_stats(logits.clone(), target, here)
    got = _triton_ce.chunk_stats(logits, target, here, splits=2, block=8)
    for a, b in zip(got, expected, strict=True):
        assert torch.isfinite(a).all(), got
        torch.testing.assert_close(a, b, rtol=RTOL, atol=0)
    lse = expected[0] + expected[1].log()
    grad_ce = torch.ones(4)
    buf = logits.clone()
    _triton_ce.chunk_grad_(buf, lse, target, here, grad_ce, block=8)
    want = ce_chunk.chunk_grad_(logits.clone(), lse, target, here, grad_ce)
    assert torch.isfinite(buf).all()
    torch.testing.assert_close(buf, want, rtol=RTOL, atol=1e-7)
    # A shard with no real column (a padded vocabulary's last rank): the TP reduction's neutrals.
    none = _triton_ce.chunk_stats(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long), here[:3])
    assert none[0].eq(float("-inf")).all() and not none[1].any() and not none[2].any()
    print("ok kernels")


def check_dispatch() -> None:
    logits = torch.zeros(2, 3)
    os.environ["NBDIFF_LOSS_BACKEND"] = "auto"
    assert ce_chunk.backend(logits) == "torch", "auto keeps torch on CPU"
    os.environ["NBDIFF_LOSS_BACKEND"] = "triton"
    assert ce_chunk.backend(logits) == "triton"
    try:
        ce_chunk.backend(logits.double())
    except RuntimeError as exc:
        assert "fp32" in str(exc), exc
    else:
        raise AssertionError("fp64 logits under NBDIFF_LOSS_BACKEND=triton must be refused")
    print("ok dispatch")


def check_linear_loss() -> None:
    gen = torch.Generator().manual_seed(1)
    b, length, h, v = 2, 12, 8, 45
    x0 = torch.randint(0, v - 1, (b, length), generator=gen)
    t = torch.rand(b, length, generator=gen) * 0.8 + 0.2
    _, masked = mask_tokens(
        x0, t[:, 0], block_size=4, mask_id=v - 1, token_shift=True, generator=gen
    )
    hidden0 = torch.randn(b, 2 * length, h, generator=gen)
    weight0 = torch.randn(v, h, generator=gen) * 0.5
    calls = {"stats": 0, "grad": 0}
    stats, grad = _triton_ce.chunk_stats, _triton_ce.chunk_grad_

    def counted_stats(*args, **kwargs):
        calls["stats"] += 1
        return stats(*args, **kwargs)

    def counted_grad(*args, **kwargs):
        calls["grad"] += 1
        return grad(*args, **kwargs)

    _triton_ce.chunk_stats, _triton_ce.chunk_grad_ = counted_stats, counted_grad
    results = {}
    for name in ("torch", "triton"):
        os.environ["NBDIFF_LOSS_BACKEND"] = name
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        terms = nbdiff_linear_loss(
            hidden, weight, x0, masked, t, ar_weight=0.5, token_shift=True, chunk_rows=7
        )
        terms.total.backward()
        results[name] = (*terms, hidden.grad, weight.grad)
    assert calls["stats"] > 1 and calls["grad"] > 1, calls  # several chunks went through Triton
    for a, b_ in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(a, b_, rtol=RTOL, atol=1e-6)
    print(f"ok linear_loss {calls}")


def main() -> None:
    assert _triton_ce.INTERPRETED, "run with TRITON_INTERPRET=1 set before triton is imported"
    torch.set_num_threads(1)
    check_kernels()
    check_dispatch()
    check_linear_loss()


if __name__ == "__main__":
    main()
