"""Project-wide test settings: offline, deterministic threads, caches kept out of the home folder."""

import os
import tempfile

# Set before transformers / datasets / lm-eval are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
_cache = tempfile.mkdtemp(prefix="nbdiff-test-cache-")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_cache, "datasets"))
os.environ.setdefault("HF_HOME", os.path.join(_cache, "hf"))
