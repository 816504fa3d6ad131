"""What a run does at step k: the block size B(k), the AR weight λ(k), the annealed mask's progress and
the learning rate. Built once from a config (`TrainConfig.step_schedule()`, from
`CurriculumConfig.build()` and `ScheduleConfig.build()`). The loop, the plots and the tests all ask it.

Every value is a function of k alone (k = 1..train.steps, the step numbering of method/curriculum.py).
Every rank therefore agrees without communication, and a resumed run continues the same schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdiff_megatron.method.curriculum import Curriculum
from nbdiff_megatron.method.schedules import LRSchedule


@dataclass(frozen=True)
class StepSchedule:
    """B(k), λ(k), annealed-mask progress and LR(k) of one training config."""

    curriculum: Curriculum
    """Block growth (eq. 3) and the λ co-schedule."""
    lr_schedule: LRSchedule
    """Warm-up, constant and cooldown of the learning rate."""
    annealed_mask: bool = False
    """The annealed-mask baseline: B_target from step 1, the mask annealed over the growth phase."""

    def block_size(self, step: int) -> int:
        """B(k), eq. 3: B_target first trains at `Curriculum.growth_end_step()`. The annealed-mask
        baseline trains at B_target from step 1 (it anneals the mask instead)."""
        if self.annealed_mask:
            return self.curriculum.target
        return self.curriculum.block_size(step)

    def ar_weight(self, step: int) -> float:
        """λ(k), co-scheduled with the block growth of eq. 3 (docs/METHOD.md §5)."""
        return self.curriculum.ar_weight(step)

    def anneal_progress(self, step: int) -> float | None:
        """Progress of the annealed mask at step k (`Curriculum.anneal_progress`); None for the other
        mask kinds."""
        if not self.annealed_mask:
            return None
        return self.curriculum.anneal_progress(step)

    def lr(self, step: int) -> float:
        """Learning rate of step k (`ScheduleConfig` explains the numbering)."""
        return self.lr_schedule.at(step)
