"""Progressive resolution (FFCV-SSL): views start small and grow to full size between two epochs.

Early epochs at a low resolution cost a fraction of the compute (a ResNet's cost scales with
pixels) and lose little accuracy once the last epochs run at full size. The size moves in a
few discrete steps (multiples of `step`), not every epoch, because each new input shape costs
a recompilation of a compiled model and a new set of cached view buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssl_lab.errors import UserError


@dataclass(frozen=True)
class ResolutionSchedule:
    """View size of each epoch: `low` until `start`, `high` from `end`, linear in between,
    rounded to a multiple of `step` (and kept inside [low, high])."""

    low: int
    high: int
    start: int
    end: int
    step: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise UserError(f"views.min_size={self.low} must be between 1 and the view size "
                            f"{self.high}")
        if not 0 <= self.start <= self.end or self.step < 1:
            raise UserError(f"progressive resolution needs 0 <= views.ramp_start ({self.start}) "
                            f"<= views.ramp_end ({self.end}) and views.size_step >= 1 "
                            f"({self.step})")

    def size(self, epoch: int) -> int:
        if epoch >= self.end:
            return self.high
        if epoch <= self.start:
            return self.low
        raw = self.low + (self.high - self.low) * (epoch - self.start) / (self.end - self.start)
        nearest = int(raw / self.step + 0.5) * self.step  # half up (round() is half to even)
        return min(self.high, max(self.low, nearest))

    def sizes(self, epochs: int) -> list[int]:
        """The size of every epoch of a run (`ssl-lab train` prints the distinct ones)."""
        return [self.size(e) for e in range(epochs)]


def schedule_from_config(min_size: int, size: int, ramp_start: int, ramp_end: int | None,
                         step: int, epochs: int) -> ResolutionSchedule | None:
    """None when progressive resolution is off (min_size 0 or already the full size).
    ramp_end None: the last epoch, so only the final epoch is sure to run at full size."""
    if not min_size or min_size == size:
        return None
    end = max(epochs - 1, ramp_start) if ramp_end is None else ramp_end
    return ResolutionSchedule(min_size, size, ramp_start, end, step)
