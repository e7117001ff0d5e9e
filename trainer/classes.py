"""Class tables: which ids a dataset's masks use, their names and colours.

The competition's table is the default: ids 0-4 match the competition data and NASA
JPL's AI4Mars labels (shifted by one, with AI4Mars' 255 "no label" mapped to
background). Other datasets declare their own (MarsData: rock against the rest; S5Mars:
nine classes), in the converted dataset, a folder's mapping file or beside an npz's
arrays; everything that names, counts, colours or scores classes follows the dataset's
table.

In every table id 0 means "not labelled": the metric leaves pixels labelled 0 out (the
competition's Keras ``MeanIoU(ignore_class=0)``) and scores ids 1..K-1. A dataset whose
files use another value for "not labelled" maps it to 0 (a mask mapping such as
``255:0``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

# A palette for classes declared without a colour (id 0 gets the first, a dark gray).
PALETTE = (
    (40, 40, 48), (214, 140, 69), (122, 92, 196), (245, 215, 90), (220, 50, 60), (70, 160, 220),
    (90, 200, 120), (240, 120, 200), (150, 150, 150), (40, 180, 170), (250, 160, 110), (120, 80, 40),
)  # fmt: skip
MAX_CLASSES = 255  # mask values are uint8 and 255 marks "ignored" pixels inside the engine


class ClassTableError(ValueError):
    """A class table that cannot be used; the message names where it was declared."""


@dataclass(frozen=True)
class TerrainClass:
    """One segmentation class: its id in the masks, its name and a fixed colour."""

    id: int
    name: str
    color: tuple[int, int, int]

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.color)

    @property
    def rgba(self) -> tuple[float, float, float, float]:
        r, g, b = self.color
        return (r / 255, g / 255, b / 255, 1.0)


class ClassTable(tuple):
    """The classes of one dataset, ids 0..K-1 in order (a tuple of :class:`TerrainClass`;
    id 0 is "not labelled"). Build one with :meth:`from_records`."""

    def __new__(cls, classes: Iterable[TerrainClass]) -> ClassTable:
        return super().__new__(cls, tuple(classes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self)

    @property
    def scored(self) -> tuple[int, ...]:
        """The ids the mean IoU is over: every id but 0 ("not labelled")."""
        return tuple(range(1, len(self)))

    def miou_label(self) -> str:
        """How the mean IoU is named: "mIoU (1-4)" for ids 1-4."""
        last = len(self) - 1
        return f"mIoU (1-{last})" if last > 1 else "mIoU (1)"

    def describe(self) -> str:
        """One line naming every class: ``0=Background, 1=Soil, ...``."""
        return ", ".join(f"{c.id}={c.name}" for c in self)

    def find(self, text) -> int | None:
        """The id named by ``text`` (an id or a name, any case), None when none is."""
        text = str(text).strip()
        if text.isdigit() and int(text) < len(self):
            return int(text)
        for c in self:
            if c.name.lower() == text.lower():
                return c.id
        return None

    def same_classes(self, other: ClassTable) -> bool:
        """The same ids with the same names (colours may differ: they only paint)."""
        return [c.name.lower() for c in self] == [c.name.lower() for c in other]

    def records(self) -> list[dict]:
        """The table as JSON-ready records: ``[{"id": 0, "name": ..., "color": "#rrggbb"}, ...]``."""
        return [{"id": c.id, "name": c.name, "color": c.hex} for c in self]

    def to_json(self) -> str:
        return json.dumps(self.records())

    @classmethod
    def from_records(cls, records, where: str = "class table") -> ClassTable:
        """A table from records as :meth:`records` writes them, as ``[id, name, colour]``
        lists (the converted format's attribute) or as an ``{id: name or {name, color}}``
        mapping (a TOML ``[classes]`` table); colours are ``#rrggbb`` or ``[r, g, b]`` and
        may be left out. Refuses anything it cannot use, naming ``where``."""
        if isinstance(records, dict):
            if "classes" in records:  # {"classes": [...], "not_labelled": 0}
                _check_not_labelled(records.get("not_labelled", 0), where)
                return cls.from_records(records["classes"], where)
            items = []
            for key, value in records.items():
                entry = dict(value) if isinstance(value, dict) else {"name": value}
                items.append({"id": key, **entry})
            records = items
        if not isinstance(records, list | tuple) or not records:
            raise ClassTableError(f"{where}: expected a list of classes (id, name, colour)")
        parsed: dict[int, TerrainClass] = {}
        for item in records:
            if isinstance(item, dict):
                cid, name, colour = item.get("id"), item.get("name"), item.get("color", item.get("colour"))
            elif isinstance(item, list | tuple) and len(item) in (2, 3):
                cid, name, colour = item[0], item[1], item[2] if len(item) == 3 else None
            else:
                raise ClassTableError(
                    f"{where}: {item!r} is not a class; expected an id, a name and a colour"
                )
            cid = _class_id(cid, where)
            if cid in parsed:
                raise ClassTableError(f"{where}: class id {cid} is given twice")
            if not isinstance(name, str) or not name.strip():
                raise ClassTableError(f"{where}: class {cid} has no name")
            parsed[cid] = TerrainClass(cid, name.strip(), _colour(colour, cid, where))
        ids = sorted(parsed)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise ClassTableError(
                f'{where}: class ids must run 0, 1, 2 ... without gaps (0 is "not labelled"); '
                f"missing {missing[:8]}"
            )
        if len(ids) < 2:
            raise ClassTableError(
                f'{where}: declares only class 0 ("not labelled"); a table needs a class to learn'
            )
        if len(ids) > MAX_CLASSES:
            raise ClassTableError(f"{where}: {len(ids)} classes; at most {MAX_CLASSES}")
        names = [parsed[i].name.lower() for i in ids]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ClassTableError(f"{where}: class name {twice[0]!r} is given to two ids")
        return cls(parsed[i] for i in ids)

    @classmethod
    def from_json(cls, text: str, where: str = "class table") -> ClassTable:
        try:
            records = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ClassTableError(f"{where}: not a JSON class table ({exc})") from None
        return cls.from_records(records, where)


def _check_not_labelled(value, where: str) -> None:
    if value != 0 and str(value).strip() != "0":
        raise ClassTableError(
            f'{where}: declares {value!r} as "not labelled"; marsviewer numbers "not labelled" 0: '
            f"map {value!r} to 0 (and the other values to 1, 2 ...) with a mask mapping"
        )


def _class_id(value, where: str) -> int:
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
    ):
        raise ClassTableError(f"{where}: class id {value!r} is not a whole number 0..{MAX_CLASSES - 1}")
    return int(value)


def _colour(value, cid: int, where: str) -> tuple[int, int, int]:
    if value is None:
        return PALETTE[cid % len(PALETTE)]
    if isinstance(value, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", value.strip()):
        digits = value.strip()[1:]
        return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    if (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)
    ):
        return tuple(value)  # type: ignore[return-value]
    raise ClassTableError(f"{where}: class {cid} has colour {value!r}; expected #rrggbb or [r, g, b]")


COMPETITION = ClassTable(
    (
        TerrainClass(0, "Background", (40, 40, 48)),
        TerrainClass(1, "Soil", (214, 140, 69)),
        TerrainClass(2, "Bedrock", (122, 92, 196)),
        TerrainClass(3, "Sand", (245, 215, 90)),
        TerrainClass(4, "Big Rock", (220, 50, 60)),
    )
)
# The competition's table under its older names (the default of every reader).
CLASSES = COMPETITION
NUM_CLASSES = len(CLASSES)
CLASS_NAMES: tuple[str, ...] = CLASSES.names
BACKGROUND = 0
# The competition metric ignores background: mIoU is over these ids.
METRIC_CLASSES: tuple[int, ...] = CLASSES.scored


def both_tables(ours: ClassTable, theirs: ClassTable, ours_name: str, theirs_name: str) -> str:
    """Two tables side by side for a refusal: ``the checkpoint's (0=..., 1=...) and the dataset's (...)``."""
    return f"{ours_name} classes ({ours.describe()}) and {theirs_name} classes ({theirs.describe()})"
