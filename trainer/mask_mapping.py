"""How the values of mask files become class ids.

A mapping is given as text, the same in the CLI (``--mask-mapping``) and napari's open
dialog:

* ``identity``: values 0..4 are the class ids (the competition's masks);
* ``ai4mars``: NASA JPL AI4Mars labels, 0..3 -> 1..4 and 255 ("no label") -> 0;
* value pairs ``"0:1,255:4"``: each listed value becomes that class (an id or a name,
  ``"255:big rock"``);
* colour pairs ``"#000000:1,#ff0000:4"`` for masks drawn in colours and saved as RGB,
  as public rock datasets are;
* the path of a TOML file whose table (top level or ``[mask_mapping]``) lists the same
  pairs: ``"#ff0000" = "big rock"``, ``0 = 1`` written ``"0" = 1``. Its ``[classes]``
  table, if any, declares the dataset's own classes (id 0 is "not labelled"), which the
  pairs then name::

      [classes]
      0 = "no label"
      1 = { name = "Rock", color = "#dc323c" }
      2 = "Ground"

      [mask_mapping]
      "255" = "no label"
      "0" = "Ground"
      "1" = "Rock"

  With ``[classes]`` and no pairs, the file's values are the ids themselves.

A value (or colour) that the mapping does not list is an error naming the file and the
value: a mask with an unexpected palette is found, not trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .classes import COMPETITION, ClassTable, ClassTableError
from .dataset import DatasetError

PRESETS = ("identity", "ai4mars")
_UNMAPPED = 255


def _class_id(target, spec: str, classes: ClassTable = COMPETITION) -> int:
    found = classes.find(target)
    if found is None:
        raise DatasetError(
            f"mask mapping {spec!r}: {str(target).strip()!r} is not a class; valid: {classes.describe()}"
        )
    return found


def _colour(text: str, spec: str) -> int:
    """'#rrggbb' -> 0xRRGGBB."""
    digits = text.strip()[1:]
    if len(digits) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
        raise DatasetError(f"mask mapping {spec!r}: {text!r} is not a colour; expected #rrggbb")
    return int(digits, 16)


class MaskMapping:
    """Raw mask values (or RGB colours) -> class ids. ``MaskMapping.parse(text)``."""

    def __init__(
        self,
        spec: str,
        values: dict[int, int] | None = None,
        colours: dict[int, int] | None = None,
        classes: ClassTable = COMPETITION,
    ):
        self.spec = spec
        self.classes = (
            classes  # the table the ids belong to (a TOML file's [classes], else the competition's)
        )
        self.colours = colours
        self.lut = np.full(65536, _UNMAPPED, np.uint8)
        for value, cls in (values or {}).items():
            self.lut[value] = cls

    @classmethod
    def parse(cls, spec: str | MaskMapping | None) -> MaskMapping:
        if isinstance(spec, MaskMapping):
            return spec
        spec = (spec or "identity").strip()
        if spec == "identity":
            return cls(spec, {v: v for v in range(len(COMPETITION))})
        if spec == "ai4mars":
            return cls(spec, {0: 1, 1: 2, 2: 3, 3: 4, 255: 0})
        if spec.lower().endswith(".toml") or (":" not in spec and Path(spec).is_file()):
            return cls._from_toml(spec)
        if ":" not in spec:
            raise DatasetError(
                f"unknown mask mapping {spec!r}; valid: identity, ai4mars, value pairs such as "
                "'0:1,255:4', colour pairs such as '#000000:1,#ff0000:4', or a .toml file"
            )
        pairs = []
        for item in spec.split(","):
            if not item.strip():
                continue
            key, sep, target = item.rpartition(":")
            if not sep or not key.strip():
                raise DatasetError(f"mask mapping {spec!r}: {item!r} is not VALUE:CLASS")
            pairs.append((key.strip(), target))
        return cls._from_pairs(spec, pairs)

    @classmethod
    def _from_toml(cls, spec: str) -> MaskMapping:
        import tomllib

        from .dataset import not_a_regular_file

        path = Path(spec)
        why = not_a_regular_file(path)
        if why and why != "no such file":
            raise DatasetError(f"{path}: {why} (a mask mapping TOML file)")
        try:
            table = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{path}: no such mask mapping file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
            raise DatasetError(f"{path}: not a readable TOML file ({exc})") from None
        classes = COMPETITION
        if "classes" in table:
            try:
                classes = ClassTable.from_records(table.pop("classes"), f"{path}: its [classes] table")
            except ClassTableError as exc:
                raise DatasetError(str(exc)) from None
            if "mask_mapping" not in table and not table:  # the file's values are the ids
                return cls(str(path), {v: v for v in range(len(classes))}, classes=classes)
        table = table.get("mask_mapping", table)
        if not isinstance(table, dict) or not table:
            raise DatasetError(f"{path}: expected a table of VALUE = CLASS pairs (or a [mask_mapping] table)")
        return cls._from_pairs(str(path), [(str(k), v) for k, v in table.items()], classes)

    @classmethod
    def _from_pairs(
        cls, spec: str, pairs: list[tuple[str, object]], classes: ClassTable = COMPETITION
    ) -> MaskMapping:
        if not pairs:
            raise DatasetError(f"mask mapping {spec!r} lists no pairs")
        is_colour = [k.startswith("#") for k, _ in pairs]
        if any(is_colour) and not all(is_colour):
            raise DatasetError(f"mask mapping {spec!r}: mixes colours and values; use one kind")
        if all(is_colour):
            colours: dict[int, int] = {}
            for key, target in pairs:
                colour, cls_id = _colour(key, spec), _class_id(target, spec, classes)
                if colour in colours and colours[colour] != cls_id:
                    raise DatasetError(
                        f"mask mapping {spec!r}: {key} is given twice, as class {colours[colour]} and "
                        f"as class {cls_id}; give each colour once"
                    )
                colours[colour] = cls_id
            return cls(spec, colours=colours, classes=classes)
        values = {}
        for key, target in pairs:
            if not key.isdigit() or int(key) > 65535:
                raise DatasetError(f"mask mapping {spec!r}: {key!r} is not a mask value 0..65535")
            cls_id = _class_id(target, spec, classes)
            if int(key) in values and values[int(key)] != cls_id:
                raise DatasetError(
                    f"mask mapping {spec!r}: value {int(key)} is given twice, as class {values[int(key)]} "
                    f"and as class {cls_id}; give each value once"
                )
            values[int(key)] = cls_id
        return cls(spec, values, classes=classes)

    @property
    def is_colour(self) -> bool:
        return self.colours is not None

    def expected(self) -> str:
        if self.spec == "identity":
            return "expected 0..4"
        if self.spec == "ai4mars":
            return "expected 0..3 and 255 (AI4Mars)"
        if self.is_colour:
            return "the mapping lists " + ", ".join(f"#{c:06x}" for c in self.colours)
        return "the mapping lists " + ", ".join(str(v) for v in np.flatnonzero(self.lut != _UNMAPPED))

    def apply(self, raw: np.ndarray, path: Path | str, lossy: bool = False):
        """(H, W) integer or (H, W, 3) uint8 mask values -> (H, W) uint8 class ids.
        ``lossy`` (a JPEG mask): values the mapping does not list become 0 (not
        labelled) instead of an error, and the result is (class ids, how many)."""
        if lossy:
            return self._apply_lossy(raw, path)
        if raw.ndim == 3:
            rgb = raw[..., :3].astype(np.uint32)
            gray = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
            if not self.is_colour and not gray:
                raise DatasetError(
                    f"{path}: mask is a colour image; expected one channel of class ids, or "
                    "give the colours: --mask-mapping '#000000:1,#ff0000:4'"
                )
            if self.is_colour:
                packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                return self._apply_colours(packed, path)
            raw = raw[..., 0]
        if self.is_colour:
            v = raw.astype(np.uint32) & 0xFF
            return self._apply_colours((v << 16) | (v << 8) | v, path)
        if raw.dtype.kind not in "ui":
            raise DatasetError(f"{path}: mask of {raw.dtype} values; expected whole numbers (class ids)")
        if raw.size and raw.min() < 0:
            raise DatasetError(
                f"{path}: mask holds negative values (down to {int(raw.min())}); {self.expected()}"
            )
        if raw.size and raw.max() > 65535:
            raise DatasetError(f"{path}: mask holds values up to {int(raw.max())}; {self.expected()}")
        mapped = self.lut[raw]
        bad = mapped == _UNMAPPED
        if bad.any():
            found = sorted(set(np.unique(raw[bad]).tolist()))
            raise DatasetError(
                f"{path}: mask values {found[:8]} are not valid with the {self.spec!r} mapping; "
                + self.expected()
            )
        return mapped

    def _apply_lossy(self, raw: np.ndarray, path) -> tuple[np.ndarray, int]:
        if raw.ndim == 3 and self.is_colour:
            rgb = raw[..., :3].astype(np.uint32)
            packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            found, inverse = np.unique(packed, return_inverse=True)
            ids = np.array([self.colours.get(int(c), _UNMAPPED) for c in found], np.uint8)
            mapped = ids[inverse.reshape(packed.shape)]
        else:
            values = raw.mean(axis=-1).round().astype(np.int64) if raw.ndim == 3 else raw.astype(np.int64)
            if self.is_colour:
                v = values.clip(0, 255).astype(np.uint32)
                return self._apply_lossy(np.stack([v, v, v], -1), path)
            mapped = self.lut[values.clip(0, 65535)]
            mapped[(values < 0) | (values > 65535)] = _UNMAPPED
        unknown = mapped == _UNMAPPED
        return np.where(unknown, 0, mapped).astype(np.uint8), int(unknown.sum())

    def _apply_colours(self, packed: np.ndarray, path) -> np.ndarray:
        found, inverse = np.unique(packed, return_inverse=True)
        ids = np.array([self.colours.get(int(c), _UNMAPPED) for c in found], np.uint8)
        if (ids == _UNMAPPED).any():
            bad = ", ".join(f"#{int(c):06x}" for c in found[ids == _UNMAPPED][:6])
            raise DatasetError(
                f"{path}: mask colours {bad} are not in the mapping {self.spec!r}; " + self.expected()
            )
        return ids[inverse.reshape(packed.shape)]
