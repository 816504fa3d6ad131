"""Training: typed config (config.py), the megatron-core loop (loop.py), checkpoints (checkpointing.py),
logging (logging.py), fault handling (faults.py) and `nbdiff train` (cli.py).

    from nbdiff_megatron.training.config import load_config
    from nbdiff_megatron.training.loop import train
    result = train(load_config("examples/tiny_cpu.yaml", ["--train.steps=50"]))

megatron-core is imported by the loop and checkpointing modules only when they run.
"""
