"""Two gloo ranks on the CPU: a failure on one rank ends every rank with the same event."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket

import numpy as np
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out_dir: str, mode: str, fail_at: int) -> None:
    """One torchrun-like process: train the tiny preset; rank 1 fails at its call ``fail_at``."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    from trainer import losses
    from trainer.config import preset
    from trainer.device import shutdown_distributed
    from trainer.engine import fit
    from trainer.synth import generate

    torch.set_num_threads(1)
    control = store = None
    if mode == "budget":  # rank 1's clock runs out of the budget after a few steps, rank 0's never
        from trainer.control import TrainControl

        ticks = {"n": 0}

        def clock():  # the ranks' clocks differ by a little, as real ones do
            ticks["n"] += 1
            return 1e6 if rank == 1 and ticks["n"] > fail_at else 0.01 * ticks["n"] * (1 + rank / 10)

        control = TrainControl(clock=clock)
    elif mode == "corrections":  # the store read a moment apart: rank 1 sees 5 more exclusions

        class Store:
            def version(self):
                return 1

            def snapshot(self):
                return {}, set(range(5)) if rank == 1 else set()

        store = Store()
    elif rank == 1:
        calls = {"n": 0}
        original = losses.SegmentationLoss.forward

        def failing(self, logits, target):
            calls["n"] += 1
            value = original(self, logits, target)
            if calls["n"] == fail_at:
                if mode == "error":
                    raise RuntimeError("injected failure")
                return value * float("nan")
            return value

        losses.SegmentationLoss.forward = failing
    ds = generate(40, 0, seed=2).dataset
    cfg = preset("tiny").replace(epochs=3, device="cpu", precision="fp32", log_every=2)
    if mode == "budget":
        cfg = cfg.replace(epochs=0, minutes=1.0)
    if mode == "stop_validating":  # frames from disk: validated a frame at a time, progress after each
        from trainer import epoch_end, formats
        from trainer.control import TrainControl

        formats.IN_MEMORY_BYTES, epoch_end.PROGRESS_EVERY_S = 1000, 0.0
        ds = formats.open_dataset(os.path.join(out_dir, "f.zarr"), lazy=True)
        cfg = cfg.replace(epochs=2, val_fraction=0.34, batch_size=4)  # 3 frames: rank 0 has 2, rank 1 one
        control = TrainControl()
    run_dir = os.path.join(out_dir, "run") if rank == 0 else None
    if mode == "used_run_dir":  # rank 0's run directory holds another run: every rank is told
        from trainer.runs import RunDirError

        try:
            said = {"kind": next(fit(ds, cfg, run_dir)).kind}
        except RunDirError as exc:
            said = {"kind": "refused", "message": str(exc)}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(said, f)
        shutdown_distributed(wait_for_peers=True)
        return
    events = []
    for e in fit(ds, cfg, run_dir, control=control, corrections=store):
        events.append(e)
        if mode == "stop_validating" and rank == 0 and e.kind == "progress" and e.done > 0:
            control.request_stop()  # after rank 0's first frame; rank 1 has none left by then
    last = events[-1]
    said = {"kind": last.kind, "message": getattr(last, "message", ""), "step": last.step}
    said["updates"] = [[e.excluded, e.train_images] for e in events if e.kind == "data_update"]
    said["validated"] = [e.images for e in events if e.kind == "validation"]
    said["pixels_scored"] = [int(np.sum(e.confusion)) for e in events if e.kind == "validation"]
    said["lr"] = [e.lr for e in events if e.kind == "step"]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(said, f)
    shutdown_distributed(wait_for_peers=True)


def _two_ranks(tmp_path, mode: str, fail_at: int = 0) -> list[dict]:
    """Run ``_rank`` as two gloo processes; what each said at its end. Neither may be
    left waiting for the other."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(tmp_path), mode, fail_at)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank was left waiting for its peer"
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _written(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["error", "nan"])
def test_a_failing_rank_ends_every_rank_with_the_same_failed_event(tmp_path, mode):
    said = _two_ranks(tmp_path, mode, 7)
    assert said[0] == said[1], said
    assert said[0]["kind"] == "failed" and said[0]["step"] <= 8
    expected = "injected failure" if mode == "error" else "the loss became nan"
    assert "rank 1" in said[0]["message"] and expected in said[0]["message"], said[0]["message"]
    written = _written(tmp_path)
    assert written[-1]["kind"] == "failed" and written[-1]["message"] == said[0]["message"]


def test_a_time_budget_ends_every_rank_at_the_same_step(tmp_path):
    """Each rank measures the budget on its own clock; where one runs out first, every
    rank stops at that step and finishes alike (alone, it would leave its peer waiting).
    The learning rate follows the budget's progress: the same on every rank, by the
    latest of their clocks (on its own, each rank's weights would drift from the others')."""
    said = _two_ranks(tmp_path, "budget", 20)
    assert said[0] == said[1] and said[0]["kind"] == "finished", said
    assert len(set(said[0]["lr"])) >= 2  # a schedule, not a constant
    assert _written(tmp_path)[-1]["reason"] == "time budget"


def test_every_rank_trains_on_rank_0s_reading_of_the_corrections(tmp_path):
    """A correction saved while the ranks read the store would give them different rows;
    rank 0 reads it and every rank takes that."""
    said = _two_ranks(tmp_path, "corrections")
    assert said[0]["kind"] == "finished" and said[0]["updates"][0][0] == 0  # rank 0 excluded none
    assert said[0]["updates"] == said[1]["updates"] and said[0]["validated"] == said[1]["validated"]
    # Each rank scores its share of the validation images and the counts are summed: every
    # pixel once (each rank scoring them all would double them and leave the IoU unchanged).
    assert said[0]["pixels_scored"] == [n * 64 * 128 for n in said[0]["validated"]], said[0]


def test_a_stop_while_validating_frames_from_disk_ends_every_rank_alike(tmp_path):
    """Validating frames from disk, the ranks agree on a stop after each round of frames;
    the rank whose share is a frame shorter agrees once more at its end."""
    from trainer.convert import convert
    from trainer.formats import write_npz
    from trainer.synth import generate

    ds = generate(9, 0, seed=4).dataset
    write_npz(tmp_path / "f.npz", ds.images, ds.masks, dtype="uint8")
    convert(tmp_path / "f.npz", tmp_path / "f.zarr")
    said = _two_ranks(tmp_path, "stop_validating")
    assert said[0] == said[1] and said[0]["kind"] == "stopped" and said[0]["validated"] == [], said


def test_a_run_directory_rank_0_cannot_use_stops_every_rank(tmp_path):
    """Only rank 0 writes the run directory; when it refuses one (here: it holds another
    run), every rank raises the same error before training instead of waiting for rank 0."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.jsonl").write_text('{"kind": "started"}\n')
    said = _two_ranks(tmp_path, "used_run_dir")
    assert said[0] == said[1] and said[0]["kind"] == "refused", said
    assert "holds another run" in said[0]["message"]
