"""Progress for long work: tqdm bars on a terminal, and the user's ``callback`` events."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Union

__all__ = ["ProgressEvent", "Events", "check_progress", "progress_bar"]


def check_progress(progress) -> Union[bool, str]:
    # Strict: a truthy typo ("alwyas", 1) must not pass for True. None is accepted as
    # "on a terminal", what it means for tk.solve's progress=.
    if progress is None:
        return True
    if not (isinstance(progress, bool) or (isinstance(progress, str) and progress == "always")):
        raise ValueError(
            f"progress must be True or None (a bar on a terminal), False (none) or 'always' (a bar "
            f"even when stderr is not a terminal: log files, notebooks); got {progress!r}"
        )
    return progress


def progress_bar(total: Optional[int], desc: str, progress: Union[bool, str], unit: str = "sample"):
    if progress is False:
        return None
    from tqdm.auto import tqdm

    # disable=None is tqdm's terminal test: a bar on a terminal, silence in logs and CI,
    # where a bar redrawn with carriage returns is noise. "always" asks for it anyway.
    disable = False if progress == "always" else None
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)


@dataclass(frozen=True)
class ProgressEvent:
    """What ``gram(..., callback=)`` receives.

    phase: "features" (after a loader batch) or "gram" (after a row block of K).
    loader: "loader" or "loader2" in the features phase; None in the gram phase.
    done, total: samples (features) or rows of K (gram) finished so far, and the total
        (None when the loader cannot tell its length).
    resumed: whether this step was read back from a checkpoint rather than computed.
    elapsed: seconds since the call started.
    """

    phase: str
    loader: Optional[str]
    done: int
    total: Optional[int]
    resumed: bool
    elapsed: float


class Events:
    """Progress bars (one per phase, on a terminal) and the user's callback."""

    def __init__(self, callback, progress: Union[bool, str]):
        self.callback, self.progress = callback, progress
        self.start = time.perf_counter()
        self.bar, self.bar_key = None, None

    def __call__(self, phase: str, loader: Optional[str], done: int, total: Optional[int], resumed: bool) -> None:
        key = (phase, loader)
        if self.progress is not False and key != self.bar_key:
            self.close()
            label = f"eNTK features ({loader})" if phase == "features" else "eNTK Gram rows"
            unit = "sample" if phase == "features" else "row"
            self.bar, self.bar_key = progress_bar(total, label, self.progress, unit), key
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        if self.callback is not None:
            self.callback(ProgressEvent(phase, loader, done, total, resumed, time.perf_counter() - self.start))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_key = None, None
