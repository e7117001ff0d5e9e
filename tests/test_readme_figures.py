"""The README's figures are the benchmark outputs kept in ``bench/out/``, rendered by
``bench/readme_figures.py``: none is typed by hand, and none is left behind by a rerun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_the_readme_quotes_is_kept():
    readme = (ROOT / "docs" / "figures.md").read_text()
    names = [p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")]
    quoted = [n for n in names if f"bench/out/{n}.json" in readme]
    assert quoted, "the README quotes no benchmark output"
    missing = [n for n in quoted if not (ROOT / "bench" / "out" / f"{n}.json").exists()]
    assert not missing, f"the README quotes bench/out/{missing[0]}.json, which is not in the repository"


def test_the_readme_figures_are_rendered_from_bench_out():
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme_figures.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr


def _bench_module(name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_a_benchmark_output_names_its_machine_and_its_make_bench_run(tmp_path, monkeypatch):
    import json

    import torch  # noqa: F401 - the stamp says what torch saw

    report = _bench_module("_report")
    monkeypatch.setenv(report.RUN_ENV, "2026-01-02T03:04Z")
    report.report({"figure": 1.5}, str(tmp_path / "out.json"))
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["figure"] == 1.5
    run = out["run"]
    assert run["make_bench"] == "2026-01-02T03:04Z"
    assert run["cpu"] and run["cpus"] >= 1 and run["torch"] and isinstance(run["cpu_bf16"], bool)
    assert len(run["date"]) == 10 and len(run["time_utc"]) == 5
    monkeypatch.delenv(report.RUN_ENV)
    assert report.run_stamp()["make_bench"] is None


def test_the_figures_say_whether_one_make_bench_run_on_one_machine_measured_them():
    figures = _bench_module("readme_figures")

    def out(run="R1", cpu="EPYC", gpu=None):
        stamp = {"date": "2026-01-02", "time_utc": "03:04", "cpu": cpu, "cpus": 2, "cpu_bf16": True}
        return {"run": {**stamp, "gpu": gpu, "torch": "2.13", "make_bench": run}}

    one = figures.provenance({"a": out(), "b": out()})
    assert one.startswith("All the figures below come from one `make bench` run (started R1)")
    assert "on one machine: EPYC, 2 CPUs (native bf16), no GPU, torch 2.13" in one
    for outputs in (
        {"a": out(), "b": out(run="R2")},  # two runs
        {"a": out(), "b": out(run=None)},  # one benchmark run on its own
        {"a": out(run=None), "b": out(run=None)},  # each run on its own
        {"a": out(), "b": {"date": "2026-01-01"}},  # an output from before the stamps
    ):
        assert figures.provenance(outputs).startswith("The figures below come from separate runs"), outputs
    assert "Not stamped with their machine: `b.json`" in figures.provenance({"a": out(), "b": {}})
    several = figures.provenance({"a": out(), "b": out(cpu="Xeon", gpu="H100")})
    assert "several machines: EPYC, 2 CPUs (native bf16), no GPU, torch 2.13 (a); Xeon" in several
    assert "H100, torch 2.13 (b)" in several
    assert figures._when(out()) == "2026-01-02 03:04 UTC"
    assert figures._when({"date": "2026-01-01"}) == "2026-01-01"


def test_the_quality_table_says_which_runs_ended_inside_their_warm_up():
    figures = _bench_module("readme_figures")
    row = {"iou": [None, 0.5, 0.5, 0.5, 0.5], "miou": 0.5, "miou_keras": 0.4, "seconds": 9.0}
    rows = [
        {**row, "variant": "short", "steps": 40, "batch_size": 128, "warmup_steps": 100},
        {**row, "variant": "long", "steps": 136, "batch_size": 32, "warmup_steps": 100},
        {**row, "variant": "from before the steps were kept"},
    ]
    text = "\n".join(figures.quality({"images": 600, "epochs": 8, "results": rows}))
    assert "| short | - | 0.500 |" in text and "| 40 x 128 | 9.0 |" in text
    assert "| 136 x 32 |" in text and "| - | 9.0 |" in text
    assert "short: 40 steps of 128 images, all inside its 100-step learning-rate warm-up" in text
    assert "long:" not in text


def test_the_gpu_figures_say_where_they_come_from_and_what_holds_the_pipeline_back():
    import json

    figures = _bench_module("readme_figures")
    assert figures.gpu({})[0].startswith("On a GPU: not measured")
    kept = [n for n in figures.GPU_OUTPUTS if (ROOT / "bench/out" / f"{n}.json").exists()]
    outputs = {n: json.loads((ROOT / "bench/out" / f"{n}.json").read_text()) for n in kept}
    t, prof = outputs["train_throughput_cuda"], outputs["step_profile_cuda"]
    text = "\n".join(figures.gpu(outputs))
    assert f"**{t['device']}**" in text and f"**{t['pipeline_img_s']}**" in text
    short = t["pipeline_img_s"] < figures.GPU_GOAL_IMG_S
    assert f"{'fall short of' if short else 'reach'} the {figures.GPU_GOAL_IMG_S:,} img/s" in text
    faster = {**outputs, "train_throughput_cuda": {**t, "pipeline_img_s": 12_000.0}}
    assert f"12,000 img/s reach the {figures.GPU_GOAL_IMG_S:,}" in "\n".join(figures.gpu(faster))
    assert f"busy **{prof['busy']}**" in text
    same = [*t["bare_rounds"]["channels_last_bf16"], t["cuda_bare_cudnn_benchmark_img_s"]["off"]]
    same.append(t["cuda_bare_batch_img_s"][str(t["batch_size"])])  # the rounds, cuDNN off, the sweep
    assert f"measured 5 times in this run gave {min(same):,.0f} to {max(same):,.0f} img/s" in text
    graphs = outputs["compile_check_cuda_graphs"]
    assert f"(**x{graphs['speedup']}**" in text and f"{graphs['break_even_steps']:,} steps" in text
    # a run of the gpu preset on the competition's 2,615 images: 19 steps an epoch, 60 epochs
    assert "makes 1,140)" in text


def test_the_whole_step_as_a_cuda_graph_is_rendered_with_whether_it_learns():
    import json

    figures = _bench_module("readme_figures")
    outputs = {n: json.loads((ROOT / "bench/out" / f"{n}.json").read_text()) for n in figures.GPU_OUTPUTS[:4]}
    run = outputs["train_throughput_cuda"]["run"]
    graph = {
        "batch_size": 128, "steps": 100, "eager_img_s": 5000.0, "graph_img_s": 12500.0, "speedup": 2.5,
        "capture_s": 1.2, "first_replay_loss": 1.5, "last_replay_loss": 1.2, "weights_changed": True,
        "nonfinite": False, "run": run,
    }  # fmt: skip
    text = "\n".join(figures.gpu({**outputs, "graph_step_cuda": graph}))
    assert "**12,500 img/s** against the same step eager 5,000 (x2.5)" in text and "the replays learn" in text
    stuck = "\n".join(figures.gpu({**outputs, "graph_step_cuda": {**graph, "weights_changed": False}}))
    assert "**the replays do not learn**" in stuck
    # A form that could not run, or whose replays did not learn, is named with why; the
    # batch norm kernels PyTorch picked are said.
    graph["variants_graph_img_s"] = {"channels_last_bf16": 8000.0, "contiguous_bf16": 3000.0}
    graph["variants_failed"] = {"channels_last_bf16_cudnn_batch_norm": "its replays did not learn"}
    graph["batch_norm_backend"] = "Native"
    text = "\n".join(figures.gpu({**outputs, "graph_step_cuda": graph}))
    assert "channels_last bf16 (the engine's) 8,000; contiguous bf16 3,000." in text
    assert "Channels_last bf16 with cuDNN's batch norm: not counted (its replays did not learn)." in text
    assert "PyTorch picks its `Native` batch norm kernels" in text


def test_the_graphed_pipeline_is_shown_beside_the_eager_one_and_its_kernels_by_kind():
    import json

    figures = _bench_module("readme_figures")
    kept = [n for n in figures.GPU_OUTPUTS if (ROOT / "bench/out" / f"{n}.json").exists()]
    outputs = {n: json.loads((ROOT / "bench/out" / f"{n}.json").read_text()) for n in kept}
    t = {**outputs["train_throughput_cuda"], "pipeline_img_s": 8000.0, "cuda_pipeline_eager_img_s": 4000.0}
    kernels = [
        {"kernel": "batch_norm_collect_statistics", "ms_per_step": 3.0, "share": 0.2, "calls_per_step": 18},
        {"kernel": "batch_norm_backward_elemt", "ms_per_step": 1.5, "share": 0.1, "calls_per_step": 18},
        {"kernel": "upsample_bilinear2d_nhwc", "ms_per_step": 0.75, "share": 0.05, "calls_per_step": 4},
        {"kernel": "sm90_xmma_fprop_implicit_gemm", "ms_per_step": 2.25, "share": 0.15, "calls_per_step": 7},
    ]
    prof = {**outputs["step_profile_cuda"], "cuda_graph": True, "top_kernels": kernels, "busy": 0.96}
    graph = {**outputs["graph_step_cuda"], "batch_size": 128, "graph_img_s": 8000.0}
    compiled = {**outputs["compile_check_cuda_graphs"], "batch_size": 128, "compiled_img_s": 10000.0}
    compiled["compile_s"] = 32.0
    text = "\n".join(
        figures.gpu(
            {
                **outputs,
                "train_throughput_cuda": t,
                "step_profile_cuda": prof,
                "graph_step_cuda": graph,
                "compile_check_cuda_graphs": compiled,
            }
        )
    )
    assert "each step replayed as one CUDA graph, img/s | **8000.0**" in text
    assert "(`cuda_graph = false`): 4000.0 (the graph **x2.00**)" in text
    assert "busy **0.96**" in text and "batch norm's channels_last kernels take 4.50 ms a step (30%" in text
    assert (
        "upsampling and its backward 0.75 ms (5%)" in text
        and "convolutions' own kernels 2.25 ms (15%)" in text
    )
    # 128/8000 - 128/10000 = 3.2 ms a step saved: 32 s of compiling pay back after 10,000 steps
    assert "pay back against the graph after about 10,000 steps, 8.8 times the 1,140" in text
    slower = {**compiled, "compiled_img_s": 7000.0}
    assert "pay back against" not in "\n".join(figures.gpu({**outputs, "compile_check_cuda_graphs": slower}))


def test_batch_quality_trains_each_batch_on_each_seed_and_is_rendered(tmp_path):
    """The batch bench on the CPU with the tiny preset: every (batch, seed) run on the same
    images, paired by seed, and the README's sentence made from it."""
    import json

    cmd = [sys.executable, str(ROOT / "bench/batch_quality.py"), "--device", "cpu", "--preset", "tiny"]
    cmd += ["--images", "24", "--epochs", "2", "--batches", "4,8", "--seeds", "0,1", "--lr-scale", "sqrt"]
    run = subprocess.run(
        cmd + ["--json", str(tmp_path / "b.json")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert [(r["batch_size"], r["seed"]) for r in out["runs"]] == [(4, 0), (8, 0), (4, 1), (8, 1)]
    small, large = out["batches"]
    assert small["paired_difference"] == 0 and large["steps"] < small["steps"]
    runs = {(r["batch_size"], r["seed"]): r for r in out["runs"]}
    assert large["miou"] == [runs[8, 0]["miou"], runs[8, 1]["miou"]]
    want = ((runs[8, 0]["miou"] - runs[4, 0]["miou"]) + (runs[8, 1]["miou"] - runs[4, 1]["miou"])) / 2
    assert abs(large["paired_difference"] - want) < 1e-4
    assert runs[8, 0]["lr"] == pytest.approx(runs[4, 0]["lr"] * 2**0.5)
    text = _bench_module("readme_figures").batch_quality(out)
    assert f"batch 8: mIoU **{large['mean_miou']:.3f}**" in text
    assert f"Batch 8 minus batch 4, seed by seed: {want:+.3f} on average" in text
    assert "scaled by the square root" in text and "seeds 0, 1" in text
