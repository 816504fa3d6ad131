"""What makes an exported folder a complete HF artifact: special token ids, generation config,
the block-diffusion `custom_generate/generate.py` and a model card.

- config.json / generation_config.json carry the tokenizer's eos (every end-of-document / end-of-turn
  id `nbdiff generate` stops at), bos and pad ids -- not LlamaConfig's defaults (2 / 1, which are
  [MASK] and pad in our tokenizer) -- and [MASK] is a suppressed token, so a plain greedy
  `model.generate` stops at EOS and equals `nbdiff generate --ar`.
- custom_generate/generate.py is `inference/hf_generate.py` with `inference/unmasking.py` (the
  unmasking rules) and `inference/refinement.py` (the block-refinement loop) inlined: the loop and the
  input checks `nbdiff generate` runs, in one file; transformers runs it in place of `generate` when
  the folder is loaded with `trust_remote_code=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbdiff_megatron.data.tokenizer import load_tokenizer, stop_token_ids
from nbdiff_megatron.errors import NBDiffError
from nbdiff_megatron.inference import hf_generate, refinement, unmasking

# The files' own markers around their package imports, replaced by inlined sources on export.
PACKAGE_IMPORTS_START = "# --- package imports: replaced by"
PACKAGE_IMPORTS_END = "# --- end of package imports ---"
# What stands for nbdiff_megatron.errors in the exported file (the only other package import).
EXPORTED_ERRORS = '''
class InferenceError(ValueError):
    """A decoding request is invalid (nbdiff_megatron.errors.InferenceError in the package)."""
'''


def special_token_ids(folder: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    """eos ids (a list), bos, pad of the tokenizer copied into `folder`; None if it cannot load."""
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    kind = info.get("tokenizer_type") or (info.get("tokenizer") or {}).get("tokenizer_type")
    path = folder if (folder / "tokenizer.json").is_file() else folder / "tokenizer.model"
    try:
        tok = load_tokenizer(kind or "HuggingFaceTokenizer", str(path))
    except (NBDiffError, OSError, ValueError):
        return None
    eos = stop_token_ids(tok)
    pad = tok.pad if tok.pad is not None and tok.pad >= 0 else (eos[0] if eos else None)
    return {"eos": eos, "bos": tok.bos, "pad": pad}


def set_special_tokens(config: Any, special: dict[str, Any]) -> None:
    """config.json's eos / bos / pad ids from the tokenizer."""
    config.eos_token_id = special["eos"][0] if len(special["eos"]) == 1 else special["eos"]
    config.bos_token_id = special["bos"]
    config.pad_token_id = special["pad"]


def write_generation_config(folder: Path, special: dict[str, Any], mask_id: int | None) -> None:
    """generation_config.json: greedy, stops at every EOS id, never emits [MASK]."""
    # heavy: transformers costs seconds at import; `nbdiff convert --help` imports this module
    from transformers import GenerationConfig

    gen = GenerationConfig(
        eos_token_id=special["eos"] if len(special["eos"]) != 1 else special["eos"][0],
        bos_token_id=special["bos"],
        pad_token_id=special["pad"],
        do_sample=False,
    )
    if mask_id is not None:
        # [MASK] is an input symbol of the diffusion half, never an answer (as in ARDecoder)
        gen.suppress_tokens = [int(mask_id)]
    gen.save_pretrained(str(folder))


def _replace_package_imports(source: str, replacement: str) -> str:
    start = source.index(PACKAGE_IMPORTS_START)
    end = source.index(PACKAGE_IMPORTS_END) + len(PACKAGE_IMPORTS_END)
    return source[:start] + replacement + source[end:]


def _inlined(module: Any, body: str) -> str:
    name = Path(module.__file__).name
    return (
        f"# --- inlined from nbdiff_megatron/inference/{name} ---\n"
        + body.replace("from __future__ import annotations\n", "")
        + f"\n# --- end of {name} ---\n"
    )


def block_generate_source() -> str:
    """inference/hf_generate.py with its package imports replaced by the sources of unmasking.py
    (the unmasking rules) and refinement.py (the refinement loop `nbdiff generate` runs): one file
    that needs torch and transformers only."""

    def source(module: Any) -> str:
        return Path(module.__file__).read_text(encoding="utf-8")

    loop = _replace_package_imports(source(refinement), EXPORTED_ERRORS)
    inlined = _inlined(unmasking, source(unmasking)) + _inlined(refinement, loop)
    return _replace_package_imports(source(hf_generate), inlined)


def write_block_generate(folder: Path) -> None:
    """custom_generate/generate.py of the exported folder."""
    target = folder / "custom_generate"
    target.mkdir(exist_ok=True)
    (target / "generate.py").write_text(block_generate_source(), encoding="utf-8")


MODEL_CARD = """\
---
library_name: transformers
tags: [nbdiff, block-diffusion, text-generation]
---
# NBDiff block-diffusion model ({family})

Exported by `nbdiff convert mcore-to-hf`. Block size {block_size}, token shift {token_shift},
mask kind {mask_kind}, blocks aligned to the {block_align} start, context {context} tokens,
[MASK] id {mask_id}.

## Block-diffusion decoding (no nbdiff install needed)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{path}")
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained("{path}", trust_remote_code=True)
inputs = tok(["Once upon a time"], return_tensors="pt", padding=True)
out = model.generate(**inputs, max_new_tokens=64)  # custom_generate/generate.py
print(tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

`trust_remote_code=True` makes transformers run `custom_generate/generate.py` as `generate`; it
gives the tokens `nbdiff generate --load {path}` gives. Its options are `nbdiff generate`'s:
`block_size`, `sub_block_size`, `token_shift`, `block_align` ("document" / "prompt"), `unmasking`
("confidence", "margin", "entropy", "topk", "static", "dynamic", "entropy_bounded"), `threshold`,
`steps_per_block`, `temperature`, `top_p`, `top_k`, `seed`, `fused_commit` (False: one commit
forward per block, the NBDiff release's schedule; same tokens). `return_dict_in_generate=True`
returns each row's stop reason ("eos", "length" = max_new_tokens, "context" = the context is full)
and the forward count too. It recomputes the prefix at every forward (exact, no KV cache): use
`nbdiff generate` for speed.

## Autoregressive decoding

Loaded without `trust_remote_code`, `model.generate(**inputs, do_sample=False)` is plain greedy AR
decoding with the model's AR head; it stops at EOS and equals `nbdiff generate --ar`.
"""


def write_model_card(folder: Path, family: str, config: Any) -> None:
    """README.md with the exact calls."""
    nb = getattr(config, "nbdiff", None) or {}
    text = MODEL_CARD.format(
        family=family,
        block_size=nb.get("block_size"),
        token_shift=nb.get("token_shift"),
        mask_kind=nb.get("mask_kind") or "context_causal",
        block_align=nb.get("block_align") or "document",
        context=config.max_position_embeddings,
        mask_id=nb.get("mask_token_id"),
        path="path/to/this/folder",
    )
    (folder / "README.md").write_text(text, encoding="utf-8")
