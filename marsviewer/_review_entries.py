"""What the Review tab lists and shows: one entry of the review queue, and the state of
the image on screen."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.audit import describe_reason


@dataclass(frozen=True)
class QueueEntry:
    """One image of the review queue and why it is there."""

    index: int
    score: float
    text: str  # the headline reason, e.g. "misaligned (move 12 px left)"
    group: tuple[int, ...] | None = None  # its duplicate-mask group, if any
    move: tuple[int, int] | None = None  # (dy, dx) the model suggests, if misaligned

    @classmethod
    def from_ranking(cls, entry: dict) -> QueueEntry:
        reasons = entry["reasons"]
        group = next((tuple(r["group"]) for r in reasons if "group" in r), None)
        move = next(((r["shift_y"], r["shift_x"]) for r in reasons if r["kind"] == "misaligned"), None)
        return cls(int(entry["index"]), float(entry["score"]), describe_reason(reasons[0]), group, move)

    @property
    def label(self) -> str:
        return self.line()

    def line(self, name: str = "") -> str:
        """The queue's line, with the image's file name where it has one."""
        return f"image {self.index:>5}{f' ({name})' if name else ''} · {self.score:.2f} · {self.text}"


@dataclass(frozen=True)
class ImageReview:
    """What the Review tab says about one image."""

    index: int
    edited: bool
    excluded: bool
    unsaved: bool
    changed_pixels: int
    history: tuple[str, ...]  # one line per store entry, the current one marked

    @property
    def summary(self) -> str:
        bits = [f"Image {self.index}", "edited" if self.edited else "original mask"]
        if self.excluded:
            bits.append("EXCLUDED from training")
        if self.unsaved:
            bits.append("unsaved changes")
        return " · ".join(bits) + f" · {self.changed_pixels} pixel(s) differ from the original"
