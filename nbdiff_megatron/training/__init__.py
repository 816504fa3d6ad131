"""Training: typed config (config.py), the run's components -- set-up (setup.py), the step (step.py,
with its micro-batches in batches.py), checkpoints (checkpointer.py over the file policy of
checkpointing.py), health and fault drills (faults.py), reports (reporting.py over logging.py) -- the
driver `train()` (loop.py) and `nbdiff train` (cli.py).

    import nbdiff_megatron
    nbdiff_megatron.install_compat()  # before megatron-core's first import (docs/ARCHITECTURE.md)
    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train
    result = train(load_config("examples/tiny_cpu.yaml", ["--train.steps=50"]))

The modules that run a training (set-up, step, checkpoints, the loop) import megatron-core at their top.
config.py, schedule.py, plan.py, checkpoint_cost.py, index_cache.py and cli.py do not, so that help,
plans and config errors answer without it; they import the others inside the function that trains.
"""
