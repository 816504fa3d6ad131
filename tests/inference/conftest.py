"""Tiny random NBDiff models for the inference tests (built once per module; CPU, fp32)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 48  # the tests use MASK_ID = VOCAB - 1 and EOS_ID = 0


def build_tiny(seq_length: int = 64, *, seed: int = 0, std: float = 0.3, **fields):
    """A 2-layer, hidden-64 model; a large init std makes its predictions peaked (thresholds matter)."""
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig

    cfg = ModelConfig(
        vocab_size=VOCAB,
        seq_length=seq_length,
        init_method_std=std,
        attention_backend="sdpa",
        **fields,
    )
    model = build_model(cfg, seed=seed)
    model.eval()
    return model


@pytest.fixture(scope="package")
def tiny_model():
    return build_tiny()


@pytest.fixture(scope="package")
def gqa_model():
    return build_tiny(num_query_groups=2, qk_layernorm=True, seed=1)


@pytest.fixture(scope="package")
def tiny_model_fp64():
    """`tiny_model`'s weights in fp64: equality checks free of fp32 summation-order noise."""
    import torch

    return build_tiny().to(torch.float64)


@pytest.fixture(scope="package")
def memorised():
    """A tiny model trained with λ = 0 (pure L_MDM, no token shift) on one sequence until it knows it."""
    import torch

    from nbdiff_megatron.method.losses import nbdiff_loss
    from nbdiff_megatron.method.noise import mask_tokens
    from nbdiff_megatron.model.builder import nbdiff_forward

    block, length, mask_id = 8, 32, VOCAB - 1
    torch.manual_seed(0)
    model = build_tiny(seq_length=64, std=0.02)
    model.train()
    text = torch.randint(1, mask_id, (1, length), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for _ in range(80):
        x0 = text.expand(8, length)
        t = torch.rand(8, generator=gen) * 0.9 + 0.1
        x_t, masked = mask_tokens(x0, t, block_size=block, mask_id=mask_id, generator=gen)
        logits = nbdiff_forward(model, x_t, x0, block_size=block, backend="sdpa")
        loss = nbdiff_loss(logits, x0, masked, t[:, None].expand(8, length), ar_weight=0.0).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, text[0].tolist()


@pytest.fixture(scope="package")
def trained_checkpoint(tmp_path_factory):
    """A tiny random model saved with training's checkpointing and a train_state like train's."""
    from nbdiff_megatron.data.bundled import bundled_tokenizer_path
    from nbdiff_megatron.data.tokenizer import load_tokenizer
    from nbdiff_megatron.model.builder import build_model
    from nbdiff_megatron.model.config import ModelConfig
    from nbdiff_megatron.training import checkpointing

    tok_path = bundled_tokenizer_path()
    tok = load_tokenizer("HuggingFaceTokenizer", tok_path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, seq_length=64, init_method_std=0.3)
    model = build_model(cfg, seed=3)
    save = tmp_path_factory.mktemp("ckpt")
    train_state = {
        "config": {
            "model": cfg.to_dict(),
            "loss": {"token_shift": True},
            "curriculum": {"target_block_size": 8},
            "noise": {"mask_token_id": None},
            "data": {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": tok_path},
        },
        "tokenizer": {"type": "HuggingFaceTokenizer", "model": tok_path},
    }
    checkpointing.save_checkpoint(save, 5, [model], None, train_state)
    return save, model, tok
