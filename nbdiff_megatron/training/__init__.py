"""Training: typed config (config.py), the run's components -- set-up (setup.py), the step (step.py,
with its micro-batches in batches.py), checkpoints (checkpointer.py over the file policy of
checkpointing.py), health and fault drills (faults.py), reports (reporting.py over logging.py) -- the
driver `train()` (loop.py) and `nbdiff train` (cli.py).

    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train
    result = train(load_config("examples/tiny_cpu.yaml", ["--train.steps=50"]))

megatron-core is imported by the set-up, step and checkpointing modules only when they run.
"""
