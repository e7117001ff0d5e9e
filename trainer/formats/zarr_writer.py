"""Writing a converted dataset (the layout is :mod:`.zarr_dataset`'s): frame by frame,
under ``OUT.partial``, renamed when complete; every chunk written and checksummed."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from ..classes import COMPETITION, ClassTable
from .zarr_dataset import CELL, FORMAT, IMAGE_RULE, VERSION, chunk_layout


class ZarrWriter:
    """Writes a dataset frame by frame under ``OUT.partial``; :meth:`finish` marks it
    complete and renames it to ``OUT``. Frames come in blocks (:func:`chunk_layout`) of
    whole chunks or shards, so each block is one write and nothing larger than a block is
    held."""

    def __init__(
        self,
        out: Path,
        n_labelled: int,
        n_total: int,
        frame: tuple[int, int],
        attrs: dict,
        classes: ClassTable = COMPETITION,
    ):
        import zarr

        self.out, self.tmp = out, out.with_name(out.name + ".partial")
        if self.tmp.exists():
            import shutil

            shutil.rmtree(self.tmp)
        h, w = frame
        chunks, shards, self.block_frames = chunk_layout(h, w)
        try:
            self.group = zarr.open_group(self.tmp, mode="w")
        except OSError as exc:
            from ..outputs import could_not_write

            self.abandon()
            raise could_not_write(out, exc) from None
        gh, gw = -(-h // CELL), -(-w // CELL)

        from zarr.codecs import Crc32cCodec, ZstdCodec

        def array(name, shape, dtype, chunks, shards=None):
            # Every chunk is written (also all-zero ones) and carries a checksum: a chunk
            # file missing or damaged later is then an error when read, never zeros.
            return self.group.create_array(
                name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=0,
                compressors=[ZstdCodec(level=0), Crc32cCodec()], config={"write_empty_chunks": True},
            )  # fmt: skip

        self.images = array("images", (n_total, h, w), "uint8", chunks, shards)
        self.masks = array("masks", (n_labelled, h, w), "uint8", chunks, shards)
        self.sizes = np.zeros((n_total, 2), np.int32)
        self.n_classes = k = len(classes)
        self.class_pixels = np.zeros((n_labelled, k), np.int64)
        self.class_cells = array("class_cells", (n_labelled, k, gh, gw), "uint16", (256, k, gh, gw))
        self.attrs = {
            "format": FORMAT, "version": VERSION, "complete": False, "id": uuid.uuid4().hex,
            "image_rule": IMAGE_RULE, "classes": [[c.id, c.name, c.hex] for c in classes],
            "every_chunk_written": True, **attrs,
        }  # fmt: skip
        self.group.attrs.update(self.attrs)
        self.frame = (h, w)
        self._block: list[tuple[int, np.ndarray, np.ndarray | None]] = []

    def add(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Frame ``row`` (rows are added in order)."""
        h, w = image.shape
        self.sizes[row] = (h, w)
        if mask is not None:
            self.class_pixels[row] = np.bincount(mask.ravel(), minlength=self.n_classes)[: self.n_classes]
        self._block.append((row, image, mask))
        if len(self._block) == self.block_frames:
            self._flush()

    def _flush(self) -> None:
        if not self._block:
            return
        H, W = self.frame
        rows = [r for r, _, _ in self._block]
        lo, hi = rows[0], rows[-1] + 1
        if hi - lo != len(rows):
            raise AssertionError("frames must be added in order")
        block = np.zeros((hi - lo, H, W), np.uint8)
        for k, (_, image, _) in enumerate(self._block):
            block[k, : image.shape[0], : image.shape[1]] = image
        self.images[lo:hi] = block
        labelled = [(r, m) for r, _, m in self._block if m is not None]
        if labelled:
            mlo, mhi = labelled[0][0], labelled[-1][0] + 1
            mblock = np.zeros((mhi - mlo, H, W), np.uint8)
            for r, m in labelled:
                mblock[r - mlo, : m.shape[0], : m.shape[1]] = m
            self.masks[mlo:mhi] = mblock
            self.class_cells[mlo:mhi] = np.stack(
                [cell_counts(m, self.frame, self.n_classes) for _, m in labelled]
            )
        self._block = []

    def finish(self, names: list[str], n_labelled: int) -> Path:
        """Close the dataset with ``names`` (rows beyond them, frames that were skipped,
        are cut off) and move it to its final name."""
        from ..outputs import replace_into

        self._flush()
        n = len(names)
        if n < self.images.shape[0] or n_labelled < self.masks.shape[0]:
            self.images.resize((n, *self.frame))
            self.masks.resize((n_labelled, *self.frame))
            self.class_cells.resize((n_labelled, *self.class_cells.shape[1:]))
            self.sizes, self.class_pixels = self.sizes[:n], self.class_pixels[:n_labelled]
        self.group.create_array("sizes", data=self.sizes, chunks=self.sizes.shape or (1, 2))
        self.group.create_array("class_pixels", data=self.class_pixels, chunks=self.class_pixels.shape)
        self.group.attrs.update({"names": names, "n_labelled": int(self.masks.shape[0]), "complete": True})
        replace_into(self.tmp, self.out)  # a dataset already there goes only once this one is in place
        return self.out

    def abandon(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def cell_counts(mask: np.ndarray, frame: tuple[int, int], n_classes: int) -> np.ndarray:
    """(C, ceil(H/64), ceil(W/64)) pixel counts of each class per 64x64 cell of the frame."""
    gh, gw = -(-frame[0] // CELL), -(-frame[1] // CELL)
    padded = np.full((gh * CELL, gw * CELL), 255, np.uint8)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    blocks = padded.reshape(gh, CELL, gw, CELL).transpose(0, 2, 1, 3).reshape(gh, gw, -1)
    return np.stack([(blocks == c).sum(-1) for c in range(n_classes)]).astype(np.uint16)
