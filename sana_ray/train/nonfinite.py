"""Non-finite steps: skipped and counted; too many in a row stop the run with the batch's files.

A step is non-finite when its (all-reduced) loss is NaN/inf, or when the strategy did not apply
it although no loss scaler was at work (a NaN/inf gradient norm). With fp16 loss scaling an
overflowing step is the scaler's normal way of finding its scale and is not counted unless the
loss itself was non-finite. The strategy never applies a non-finite gradient, so the weights stay
finite; the checkpoint writer checks them once more before saving.
"""

from __future__ import annotations

import math
from typing import Callable


class NonFiniteTraining(FloatingPointError):
    pass


class NonFiniteGuard:
    def __init__(self, limit: int, *, total: int = 0, in_a_row: int = 0) -> None:
        self.limit = limit
        self.total = total
        self.in_a_row = in_a_row

    def observe(self, step: int, loss: float, applied: bool, loss_scaling: bool,
                batch_files: Callable[[], list[str]]) -> bool:
        """Record optimizer step ``step``; True when it was non-finite. Raises after ``limit`` in a row."""
        nonfinite = not math.isfinite(loss) or (not applied and not loss_scaling)
        if not nonfinite:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            files = batch_files()
            shown = "\n  ".join(files[:32]) + (f"\n  ... and {len(files) - 32} more" if len(files) > 32 else "")
            raise NonFiniteTraining(
                f"{self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}) had a non-finite loss or "
                f"gradient (last loss {loss}); they were skipped, and training stops here "
                f"(training.max_nonfinite_steps: {self.limit}). Step {step} trained on these images:\n  {shown}\n"
                "Check them for corrupt or extreme content, or lower the learning rate / use fp32 or bf16."
            )
        return True
