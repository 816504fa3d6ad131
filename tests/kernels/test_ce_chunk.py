"""The fused loss's per-chunk passes (kernels/ce_chunk.py): the torch functions against a direct
log-softmax, the backend dispatch, the Triton kernels under Triton's CPU interpreter (a subprocess,
so that TRITON_INTERPRET=1 is set before triton is imported), and the Triton kernels on CUDA."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbdiff_megatron.kernels import ce_chunk

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = (
    "triton is not installed in this venv (it is a ~200 MB wheel, 690 MB installed, kept out of "
    "the dev extras); the CI's second stage venv (Python 3.12, CUDA torch) has it and runs this test"
)


def _case(dtype: torch.dtype, rows: int = 7, cols: int = 13, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(dtype) * 5
    target = torch.randint(0, cols, (rows,), generator=gen)
    here = torch.tensor([True, False, True, True, False, True, False])[:rows]
    return logits, target, here


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv(ce_chunk.BACKEND_ENV, raising=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_stats_match_log_softmax(dtype):
    logits, target, here = _case(dtype)
    log_probs = torch.log_softmax(logits, dim=-1)
    row_max, sum_exp, target_logit = ce_chunk.chunk_stats(logits.clone(), target, here)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(row_max, logits.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(row_max + sum_exp.log(), torch.logsumexp(logits, -1), **tol)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    assert torch.all(target_logit[~here] == 0)  # the owner shard adds these under TP
    torch.testing.assert_close(target_logit[here], picked[here], rtol=0, atol=0)
    # CE of the rows whose target is here: lse - target logit = -log_softmax[target].
    ce = row_max + sum_exp.log() - target_logit
    torch.testing.assert_close(
        ce[here], -log_probs.gather(1, target[:, None]).squeeze(1)[here], **tol
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_grad_is_softmax_minus_onehot_times_upstream(dtype):
    logits, target, here = _case(dtype, seed=1)
    grad_ce = torch.linspace(0.1, 2.0, logits.shape[0], dtype=dtype)
    lse = torch.logsumexp(logits, -1)
    onehot = torch.nn.functional.one_hot(target, logits.shape[1]).to(dtype) * here[:, None]
    expected = (torch.softmax(logits, -1) - onehot) * grad_ce[:, None]
    buf = logits.clone()
    out = ce_chunk.chunk_grad_(buf, lse, target, here, grad_ce)
    assert out.data_ptr() == buf.data_ptr()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out, expected, **tol)
    # The same thing through autograd of the cross-entropy (rows whose target is here).
    leaf = logits.clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(leaf, target, reduction="none")
    (ce * grad_ce * here).sum().backward()
    torch.testing.assert_close(out[here], leaf.grad[here], **tol)


def test_backend_dispatch(monkeypatch):
    logits = torch.zeros(2, 3)
    assert ce_chunk.backend(logits) == "torch"  # auto on CPU
    monkeypatch.setenv(ce_chunk.BACKEND_ENV, "torch")
    assert ce_chunk.backend(logits) == "torch"
    monkeypatch.setenv(ce_chunk.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="NBDIFF_LOSS_BACKEND='cuda' is not a loss backend"):
        ce_chunk.backend(logits)
    # Requested but impossible here (triton absent, or present without its interpreter on CPU).
    monkeypatch.setenv(ce_chunk.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="NBDIFF_LOSS_BACKEND=triton, but"):
        ce_chunk.backend(logits)


def test_without_triton_auto_is_torch_and_triton_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(ce_chunk, "_triton_ce", None)
    monkeypatch.setattr(
        ce_chunk, "_TRITON_MISSING", "ModuleNotFoundError: No module named 'triton'"
    )
    logits = torch.zeros(2, 3, device="cuda" if torch.cuda.is_available() else "cpu")
    assert ce_chunk.backend(logits) == "torch"
    monkeypatch.setenv(ce_chunk.BACKEND_ENV, "triton")
    with pytest.raises(RuntimeError, match="triton is not importable"):
        ce_chunk.backend(logits)


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_triton_kernels_under_the_interpreter_equal_torch():
    """Subprocess with TRITON_INTERPRET=1: kernels == torch functions (fp32, rtol 1e-5) over ragged
    shapes and strided rows, and nbdiff_linear_loss with the Triton backend == the torch one."""
    from tests.launch import clean_env

    script = Path(__file__).with_name("triton_interpret_check.py")
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=clean_env({"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for line in ("ok kernels", "ok dispatch", "ok linear_loss"):
        assert line in proc.stdout, proc.stdout


def _compile_for_hopper(kernel, signature: dict[str, str], block: int, num_warps: int) -> str:
    """The PTX of ``kernel`` compiled for sm_90 (H100 / H200) without a GPU, with the alignment
    the runtime's specialisation sees for 16-divisible arguments (a padded vocabulary shard)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # another triton layout: the GPU tests still compile it
        pytest.skip(f"triton's ahead-of-time compile API is not available: {exc}")
    names = [name for name in signature if signature[name] != "constexpr"]
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n != "n_splits"}
    source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK": block}, attrs=aligned)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    assert compiled.asm["cubin"], "no cubin"
    return compiled.asm["ptx"]


@pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)
def test_triton_kernels_compile_for_hopper_with_vector_memory_access():
    """Without a GPU: both kernels lower to sm_90 code (what the interpreter cannot check), and
    their logits traffic is 128-bit vector loads / stores -- the memory-bound passes' design."""
    from nbdiff_megatron.kernels import _triton_ce

    if _triton_ce.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 in this process: no compiled kernels to inspect")
    rows = {"logits_ptr": "*fp32", "row_stride": "i32"}
    stats = _compile_for_hopper(
        _triton_ce._stats_kernel,
        {
            **rows,
            "target_ptr": "*i64",
            "max_ptr": "*fp32",
            "sum_ptr": "*fp32",
            "picked_ptr": "*fp32",
            "n_cols": "i32",
            "span": "i32",
            "n_splits": "i32",
            "BLOCK": "constexpr",
        },
        _triton_ce._STATS_BLOCK,
        8,
    )
    grad = _compile_for_hopper(
        _triton_ce._grad_kernel,
        {
            **rows,
            "lse_ptr": "*fp32",
            "target_ptr": "*i64",
            "grad_ptr": "*fp32",
            "n_cols": "i32",
            "BLOCK": "constexpr",
        },
        _triton_ce._GRAD_BLOCK,
        4,
    )
    assert "ld.global.v4.b32" in stats
    assert "ld.global.v4.b32" in grad and "st.global.v4.b32" in grad


def _gpu_triton(test):
    """gpu-marked, and skipped without CUDA or triton."""
    test = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test)
    return pytest.mark.gpu(test)


@_gpu_triton
@pytest.mark.parametrize(("rows", "cols"), [(256, 151_936), (3, 151_936), (64, 37_987)])
def test_triton_equals_torch_on_cuda(rows, cols, monkeypatch):
    """A realistic chunk (Qwen's padded vocabulary), a few-row chunk (split columns) and a
    non-power-of-two vocabulary shard: the Triton passes equal the torch ones in fp32."""
    from nbdiff_megatron.kernels import _triton_ce

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(rows, cols, device="cuda", generator=gen) * 4
    target = torch.randint(0, cols, (rows,), device="cuda", generator=gen)
    here = torch.rand(rows, device="cuda", generator=gen) > 0.25
    grad_ce = torch.rand(rows, device="cuda", generator=gen) + 0.1
    assert ce_chunk.backend(logits) == "triton"
    got = ce_chunk.chunk_stats(logits, target, here)
    lse = got[0] + got[1].log()
    got_grad = ce_chunk.chunk_grad_(logits.clone(), lse, target, here, grad_ce)
    monkeypatch.setenv(ce_chunk.BACKEND_ENV, "torch")
    want = ce_chunk.chunk_stats(logits.clone(), target, here)
    want_grad = ce_chunk.chunk_grad_(logits.clone(), lse, target, here, grad_ce)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-9)
    assert _triton_ce.INTERPRETED is False


@_gpu_triton
def test_linear_loss_triton_equals_torch_on_cuda(monkeypatch):
    """nbdiff_linear_loss in fp32 on CUDA: the Triton backend (auto) == the torch backend."""
    from nbdiff_megatron.kernels import nbdiff_linear_loss
    from nbdiff_megatron.method.noise import mask_tokens

    gen = torch.Generator().manual_seed(3)
    b, length, h, v = 2, 256, 64, 50_000
    x0 = torch.randint(0, v - 1, (b, length), generator=gen)
    t = torch.rand(b, length, generator=gen) * 0.8 + 0.2
    _, masked = mask_tokens(
        x0, t[:, 0], block_size=16, mask_id=v - 1, token_shift=True, generator=gen
    )
    x0, t, masked = x0.cuda(), t.cuda(), masked.cuda()
    hidden0 = torch.randn(b, 2 * length, h, generator=gen).cuda()
    weight0 = (torch.randn(v, h, generator=gen) * 0.1).cuda()
    results = {}
    for name in ("auto", "torch"):
        monkeypatch.setenv(ce_chunk.BACKEND_ENV, name)
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        terms = nbdiff_linear_loss(
            hidden, weight, x0, masked, t, ar_weight=0.5, token_shift=True, chunk_rows=100
        )
        terms.total.backward()
        results[name] = (*terms, hidden.grad, weight.grad)
    for a, b_ in zip(results["auto"], results["torch"], strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
