"""Write the figures (``docs/figures.md``) from ``bench/out/*.json``: no figure is typed by hand.

The page holds the block between ``<!-- figures:start -->`` and ``<!-- figures:end -->``;
this script renders it from the benchmark outputs that exist (a benchmark not run yet
says so instead of showing an old number).

    python bench/readme_figures.py           # rewrite the block
    python bench/readme_figures.py --check   # exit 1 if the page is out of date
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"
CLASS_NAMES = ["Soil", "Bedrock", "Sand", "Big Rock"]


def _load(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _when(d: dict) -> str:
    """When a benchmark ran: its stamp (bench/_report.py), or the date outputs written before
    the stamps kept."""
    run = d.get("run")
    if run:
        return f"{run['date']} {run['time_utc']} UTC"
    return d.get("date") or "date not recorded"


def _machine(run: dict) -> str:
    bf16 = {True: "native bf16", False: "no native bf16"}.get(run.get("cpu_bf16"), "bf16 not checked")
    gpu = run.get("gpu") or "no GPU"
    torch = f", torch {run['torch']}" if run.get("torch") else ""
    return f"{run['cpu']}, {run['cpus']} CPUs ({bf16}), {gpu}{torch}"


def provenance(outputs: dict[str, dict], apart: str | None = None) -> str:
    """One line on where the figures come from: the machine, and whether one ``make bench``
    run measured them all (but those ``apart`` names); anything else is said, file by file."""
    stamped = {name: d["run"] for name, d in outputs.items() if d.get("run")}
    unstamped = [name for name in outputs if name not in stamped]
    machines: dict[str, list[str]] = {}
    for name, run in stamped.items():
        machines.setdefault(_machine(run), []).append(name)
    runs = {run.get("make_bench") for run in stamped.values()}
    if len(machines) == 1:
        where = f", on one machine: {next(iter(machines))}"
    elif machines:
        where = ", on several machines: " + "; ".join(f"{m} ({', '.join(n)})" for m, n in machines.items())
    else:
        where = ""
    if stamped and not unstamped and len(runs) == 1 and None not in runs:
        but = f", but {apart}," if apart else ""
        text = f"All the figures below{but} come from one `make bench` run (started {runs.pop()}){where}."
    else:
        text = f"The figures below come from separate runs of the benchmarks (each gives its date){where}."
    if unstamped:
        text += f" Not stamped with their machine: {', '.join(f'`{n}.json`' for n in unstamped)}."
    return text


def throughput(t: dict) -> list[str]:
    bare = t["bare_img_s"]
    return (
        [
            f"Training and inference speed (`bench/out/train_throughput.json`, {_when(t)}, {t['device']}, "
            f"torch {t['torch']}; {t['cpu_bf16'] or ''}). `{t['preset']}` preset, batch {t['batch_size']}, "
            f"{t['image_shape'][0]}x{t['image_shape'][1]}; auto precision picked **{t['auto_precision']}**:",
            "",
            "| what | figure |",
            "| --- | --- |",
            f"| bare step (forward + cross-entropy + backward + the engine's fused AdamW), img/s: contiguous fp32 / "
            f"channels_last fp32 / contiguous bf16 / channels_last bf16 | {bare['contiguous_fp32']} / "
            f"{bare['channels_last_fp32']} / {bare['contiguous_bf16']} / **{bare['channels_last_bf16']}** |",
            f"| whole `fit()` pipeline (augmentation, oversampling, the preset's loss, validation every "
            f"epoch), img/s | **{t['pipeline_img_s']}**: {t['ratio']} of the fastest bare step{_spread(t)} |",
            f"| model FLOPs x pipeline img/s | {t['gflops_pipeline']} GFLOP/s = {t['gflops_pipeline_share']} of "
            f"the faster 2048x2048 matmul (fp32 {t['gflops_matmul_fp32']}, bf16 {t['gflops_matmul_bf16']} "
            f"GFLOP/s); {t['train_gflop_per_image']} GFLOP per training image |",
            f"| prediction (`predict_arrays`, batch {t['predict_batch']}), img/s | {t['predict_img_s']}: "
            f"{t['predict_over_pipeline']}x the training pipeline |",
        ]
        + _allocator_row(t)
        + (
            [
                f"| `mars-trainer submit` on {t['submit_images']:,} test images (read, predict, write the CSV) "
                f"| {t['submit_s']} s |"
            ]
            if "submit_s" in t
            else []
        )
    )


def _spread(t: dict) -> str:
    """Each run behind the means, so that a reader sees how much the load moved them."""
    rounds, runs = t.get("bare_rounds"), t.get("pipeline_runs_img_s")
    if not rounds or not runs:
        return ""
    fastest = max(t["bare_img_s"], key=t["bare_img_s"].get)
    return (
        f" (the runs behind the means: pipeline {' / '.join(map(str, runs))}; bare {fastest} "
        f"{' / '.join(map(str, rounds[fastest]))})"
    )


def _allocator_row(t: dict) -> list[str]:
    a = t.get("allocator_bare_img_s")
    if not a:
        return []
    f = a["faults_per_step"]
    return [
        f"| bare {a['variant']} step in fresh processes, img/s: glibc's allocator as it starts / "
        f"tuned as `fit()` tunes it (`trainer/allocator.py`) | {a['system']} / **{a['tuned']}** "
        f"({a['tuned'] / a['system']:.2f}x; medians of {a['pairs']} pairs, tuned faster in "
        f"{a['tuned_faster']}); page faults a step {f['system']:,.0f} / {f['tuned']:,.0f} |"
    ]


def quality(q: dict) -> list[str]:
    lines = [
        f"What each ingredient and preset buys (`bench/out/quality.json`, {_when(q)}): {q['images']} "
        f"synthetic images, the same held-out 10%, {q['epochs']} epochs each, scored at the last "
        "epoch (no epoch is picked on the images it is scored on):",
        "",
        f"| variant | precision | {' | '.join(CLASS_NAMES)} | mIoU (1-4) | mIoU as Keras | steps x batch | seconds |",
        "| --- | --- |" + " ---: |" * (len(CLASS_NAMES) + 4),
    ]
    for r in q["results"]:
        cells = [_f(v) for v in r["iou"][1:]]
        steps = f"{r['steps']} x {r['batch_size']}" if "steps" in r else "-"
        lines.append(
            f"| {r['variant']} | {r.get('precision', '-')} | {' | '.join(cells)} | **{_f(r['miou'])}** | "
            f"{_f(r.get('miou_keras'))} | {steps} | {r['seconds']} |"
        )
    return lines + _warming_up(q["results"])


def _warming_up(rows: list[dict]) -> list[str]:
    """A sentence for each variant whose run ended inside its learning-rate warm-up: its
    row shows a model that has hardly started, not what the recipe reaches."""
    out = []
    for r in rows:
        if "steps" in r and r["steps"] <= r["warmup_steps"]:
            out.append(
                f"{r['variant']}: {r['steps']} steps of {r['batch_size']} images, all inside its "
                f"{r['warmup_steps']}-step learning-rate warm-up. It is made for far longer runs on "
                "far more images; on this budget it has hardly started, and its row says only that."
            )
    return ["", *out] if out else []


def precision_quality(q: dict) -> list[str]:
    verdict = "within" if q["within_seed_noise"] else "beyond"
    paired = [b - f for b, f in zip(q["miou"]["bf16"], q["miou"]["fp32"], strict=True)]
    return [
        f"bf16 against fp32 (`bench/out/precision_quality.json`, {_when(q)}): the `cpu` preset, "
        f"{q['images']} images, {q['epochs']} epochs, seeds {', '.join(map(str, q['seeds']))}: mean mIoU "
        f"bf16 {q['mean_bf16']} (each seed: {', '.join(map(str, q['miou']['bf16']))}), fp32 {q['mean_fp32']} "
        f"({', '.join(map(str, q['miou']['fp32']))}); mean difference {q['mean_difference']:+.4f} against a "
        f"seed-to-seed standard deviation of {q['seed_std']}: {verdict} seed noise. Paired by seed, bf16 "
        f"minus fp32: {', '.join(f'{d:+.4f}' for d in paired)}.",
    ]


def audit_models(a: dict) -> list[str]:
    return [
        f"One out-of-fold audit model, {a['minutes_each']} minute each, {a['held_out']} held-out images "
        f"(`bench/out/audit_models.json`, {_when(a)}): audit recipe {a['audit_recipe']['steps']} steps, pixel "
        f"accuracy vs clean masks **{a['audit_recipe']['pixel_accuracy_vs_clean']}**; `cpu` preset "
        f"{a['cpu_preset']['steps']} steps, {a['cpu_preset']['pixel_accuracy_vs_clean']} (ratio "
        f"{a['ratio']}). Same in both: {a['same_in_both']}; differs (audit, cpu): "
        + ", ".join(f"{k} {v[0]} vs {v[1]}" for k, v in a["differs"].items())
        + ".",
    ]


def audit_quality(a: dict) -> list[str]:
    s, runs = a["summary"], a["runs"]
    first = runs[0]
    return [
        f"Review queue (`bench/out/audit_quality.json`, {_when(a)}): {first['images']} synthetic images with "
        f"{first['planted']} planted problems ({first['outliers']} outliers sharing one mask, "
        f"{first['corrupted']} corrupted masks), a {s['minutes']}-minute audit ({s['folds']} folds), "
        f"seeds {', '.join(map(str, s['seeds']))}: recall in the top {first['k']} (1.5 x planted) "
        f"**{s['recall_at_k_mean']} mean, {s['recall_at_k_min']} worst** "
        f"({', '.join(str(r['recall_at_k']) for r in runs)}); corrupted masks alone "
        f"{s['recall_corrupted_at_k_mean']}; the outlier group exactly at the top on every seed: "
        f"{'yes' if s['outlier_group_at_top'] else 'no'}. Baseline (rank by per-image IoU between the "
        f"same predictions and the mask): {s['baseline_recall_at_k_mean']} mean, corrupted "
        f"{s['baseline_recall_corrupted_at_k_mean']}.",
    ]


def gui(g: dict) -> list[str]:
    return [
        f"Viewer while training (`bench/out/gui_responsiveness.json`, {_when(g)}, a browse step every "
        f"{g['pace_s']} s under Xvfb, {g['block_s']} s blocks alternated in the same minutes): "
        f"browse p99 {g['train_p99_ms']} ms with training going in a child process against "
        f"{g['suspended_p99_ms']} ms with it suspended (ratio **{g['ratio_p99']}**; "
        f"{g['idle_p99_ms']} ms before training started); the same training in a thread of napari's "
        f"process p99 {g['baseline_thread_p99_ms']} ms; first live prediction {g['first_preview_s']} s "
        f"after Start. Training keeps **{g['train_speed_quiet']}** of its speed with the viewer open and "
        f"untouched (the viewer itself uses {g['viewer_cpu_share_quiet']} of a core then), "
        f"**{g['train_speed_browsing']}** while someone browses.",
    ]


def compile_check(c: dict) -> list[str]:
    verdict = (
        f"it would pay back after {c['break_even_steps']} steps"
        if c["break_even_steps"]
        else "it never pays back"
    )
    return [
        f"`torch.compile` (`bench/out/compile_check.json`, {_when(c)}, {c['precision']}): compiling the "
        f"`cpu` preset's training step took {c['compile_s']} s; compiled {c['compiled_img_s']} img/s against "
        f"eager {c['eager_img_s']} (x{c['speedup']}): {verdict}. The engine runs eager.",
    ]


def label_confidence(c: dict) -> list[str]:
    by_level = {r["confidence"]: r for r in c["levels"]}
    d, every = by_level[c["default"]], by_level[0.0]
    return [
        f"Predictions as starting labels (`bench/out/label_confidence.json`, {_when(c)}, `{c['preset']}` preset, "
        f"{c['epochs']} epochs on {c['train_images']} synthetic images, {c['held_out_images']} unseen "
        f"images): every pixel kept, {every['kept_right']} of them are right (the model predicts "
        f"background on {c['predicted_background_share']} of the pixels, where "
        f"{c['background_truth_share']} are background). Keeping pixels of confidence >= "
        f"**{c['default']}** (the lowest whose kept pixels are {c['target_kept_right']} right, the "
        f"default) keeps {d['kept']} of the pixels, {d['kept_right']} of them right, "
        f"{d['terrain_covered']} of the terrain.",
    ]


def active_learning(a: dict) -> list[str]:
    labels = a["labels"]
    rows = " | ".join(str(n) for n in labels)
    per_seed = ", ".join("-" if v is None else f"{v}" for v in a["labels_saved_per_seed"])
    saved = a["labels_saved"]
    return [
        f"Label next against random picks (`bench/out/active_learning.json`, {_when(a)}, {len(a['runs'])} seeds, "
        f"{a['sites']} synthetic sites, the first {labels[0]} labels from sites "
        f"{', '.join(map(str, a['start_sites']))}, +{labels[1] - labels[0]} labels a round, "
        f"{a['steps_per_round']} training steps a round; mIoU on held-out images of every site):",
        "",
        f"| labels | {rows} |",
        "| --- |" + " --- |" * len(labels),
        "| queue mIoU | " + " | ".join(f"{v:.3f}" for v in a["queue_miou"]) + " |",
        "| random mIoU | " + " | ".join(f"{v:.3f}" for v in a["random_miou"]) + " |",
        "",
        f"The queue reached random selection's final mIoU with "
        f"**{'-' if saved is None else f'{100 * saved:.0f}%'} fewer labels** (per seed: {per_seed}; "
        f"spread of random's final mIoU over seeds {a['seed_spread_final']}).",
    ]


def scale(r: dict) -> list[str]:
    return [
        f"Data larger than memory (`bench/out/scale.json`, {_when(r)}): "
        f"{r['frames']} synthetic frames of {r['size']}x{r['size']} ({r['dataset_gb']} GB of images and "
        f"masks). `convert`: {r['convert_images_per_s']} frames/s, peak memory {r['convert_peak_rss_mb']} MB. "
        f"Training the `cpu` preset on {r['train_tile']}x{r['train_tile']} crops, batch {r['train_batch']}: "
        f"{r['train_disk_images_per_s']} crops/s read from disk against {r['train_memory_images_per_s']} "
        f"from {r['memory_frames']} frames held in memory (**{r['disk_vs_memory']}x**; means of "
        f"{r.get('train_rounds', 1)} alternated runs each), peak memory "
        f"{r['train_disk_peak_rss_mb']} MB from disk. A {r['predict_shape'][0]}x{r['predict_shape'][1]} "
        f"frame predicted by tiles in {r['predict_4096_s']} s (peak memory {r['predict_peak_rss_mb']} MB); "
        f"a tiled prediction of a {r['agreement_frame'][0]}x{r['agreement_frame'][1]} frame agrees with the "
        f"whole-frame prediction on **{100 * r['agreement_tiled_whole']:.2f}%** of pixels. "
        f"napari ({'lazily, from disk' if r['napari_lazy'] else 'read into memory'}): the dataset opens in "
        f"**{r['napari_open_s']} s**; {r['napari_browse_steps']} browse steps to frames not seen before take "
        f"{r['napari_browse_median_ms']} ms (median), {r['napari_browse_worst_ms']} ms at worst; a paint "
        f"stroke saved in {r['napari_paint_save_s']} s; peak memory {r['napari_peak_rss_mb']} MB.",
    ]


def crop_rate(r: dict) -> list[str]:
    c = r["cases"]
    small, crops, crops32 = c["small"], c["crops"], c["crops_32"]
    return [
        f"Large frames against small images (`bench/out/crop_rate.json`, {_when(r)}): a folder of "
        f"{r['frames']} frames of {r['frame'][0]}x{r['frame'][1]} trained on {r['tile']}x{r['tile']} crops "
        f"with the `cpu` preset, against 3,000 images of 64x128 trained whole; each case in a process of its "
        f"own, {r['rounds']} alternated rounds, medians. Pixels a second: small images "
        f"{small['pixels_per_s'] / 1e6:.2f} M; crops as a step now holds them (`{_crops_per_step(crops)}`) "
        f"{crops['pixels_per_s'] / 1e6:.2f} M, **{r['crops_vs_small']}x** the small images' rate "
        f"(each round: {', '.join(str(v) for v in r['ratio_each_round'])}), peak memory "
        f"**{crops['peak_rss_mb']} MB**; 32 crops a step, as before, {crops32['pixels_per_s'] / 1e6:.2f} M "
        f"({r['crops_32_vs_small']}x), peak memory {crops32['peak_rss_mb']} MB "
        f"(small images: {small['peak_rss_mb']} MB).",
    ]


def _crops_per_step(case: dict) -> str:
    data = case.get("data", "")
    return data.split("(", 1)[1].split(")", 1)[0] if "(" in data else data


def peer(r: dict) -> list[str]:
    """mIoU against minutes of training, marsviewer and the peer, per dataset."""
    lines = [
        f"Time to quality against the U-Net people would otherwise write (`bench/out/peer.json`, {_when(r)}; "
        f"the peer: {r['peer']}; both in one process on {r['threads']} threads, scored alike on held-out "
        "images: mIoU over classes 1-4, a class predicted but never labelled counting 0):",
        "",
        "| data | tool | " + " | ".join(f"{m:g} min" for m in r["budgets"]) + " |",
        "| --- | --- |" + " ---: |" * len(r["budgets"]),
    ]
    for name, d in r["datasets"].items():
        what = f"{name}: {d['train']} train / {d['test']} test, {d['size'][0]}x{d['size'][1]}"
        for tool in ("marsviewer", "peer"):
            cells = []
            for run in d[tool]:
                bold = tool == "marsviewer" and d["ahead_at_every_budget"]
                value = f"{run['miou']:.3f}"
                cells.append(f"**{value}**" if bold else value)
            lines.append(f"| {what if tool == 'marsviewer' else ''} | {tool} | " + " | ".join(cells) + " |")
    ahead = [n for n, d in r["datasets"].items() if d["ahead_at_every_budget"]]
    behind = [n for n in r["datasets"] if n not in ahead]
    lines.append("")
    where = "both datasets" if len(ahead) == 2 == len(r["datasets"]) else " and ".join(ahead)
    lines.append(
        (f"marsviewer is ahead at every budget on {where}" if ahead else "")
        + ("; " if ahead and behind else "")
        + (f"not at every budget on {' and '.join(behind)}" if behind else "")
        + ". Steps made (marsviewer / peer, at the longest budget): "
        + "; ".join(
            f"{n} {d['marsviewer'][-1]['steps']} / {d['peer'][-1]['steps']}" for n, d in r["datasets"].items()
        )
        + "."
    )
    return lines


def gpu(outputs: dict[str, dict]) -> list[str]:
    """The GPU's figures: ``bash bench/gpu.sh`` on a machine with one, apart from ``make
    bench`` (which runs where CI does, without a GPU)."""
    t = outputs.get("train_throughput_cuda")
    if t is None:
        return ["On a GPU: not measured (`bash bench/gpu.sh` on a machine with one writes these figures)."]
    bare, run = t["bare_img_s"], t["run"]
    lines = [
        f"On a GPU (`bash bench/gpu.sh`, run apart from `make bench`; `bench/out/train_throughput_cuda.json`, "
        f"{_when(t)}, **{t['device']}**, {run['cpus']} CPUs, torch {t['torch']}). `{t['preset']}` preset, "
        f"batch {t['batch_size']}, {t['image_shape'][0]}x{t['image_shape'][1]}, {t['images']:,} synthetic "
        f"images; auto precision picked **{t['auto_precision']}**:",
        "",
        "| what | figure |",
        "| --- | --- |",
        f"| bare step, img/s: contiguous fp32 / channels_last fp32 / contiguous bf16 / channels_last bf16 | "
        f"{bare['contiguous_fp32']} / {bare['channels_last_fp32']} / {bare['contiguous_bf16']} / "
        f"**{bare['channels_last_bf16']}** |",
        _gpu_pipeline_row(t),
        f"| model FLOPs x pipeline img/s | {t['gflops_pipeline'] / 1000:.1f} TFLOP/s = "
        f"{t['gflops_pipeline_share']} of a 2048x2048 bf16 matmul ({t['gflops_matmul_bf16'] / 1000:.1f} "
        f"TFLOP/s; fp32 {t['gflops_matmul_fp32'] / 1000:.1f}) |",
        f"| prediction (`predict_arrays`, batch {t['predict_batch']}), img/s | {t['predict_img_s']}: "
        f"{t['predict_over_pipeline']}x the training pipeline |",
        f"| `mars-trainer submit` on {t['submit_images']:,} test images | {t['submit_s']} s |",
    ]
    if "cuda_bare_batch_img_s" in t:
        by = lambda d: " / ".join(f"{k}: {v}" for k, v in d.items())  # noqa: E731
        cudnn = t["cuda_bare_cudnn_benchmark_img_s"]
        lines += [
            f"| bare channels_last bf16 step by batch, img/s | {by(t['cuda_bare_batch_img_s'])} |",
            f"| whole pipeline by batch, img/s | {t['batch_size']}: {t['pipeline_img_s']} / "
            f"{by(t['cuda_pipeline_batch_img_s'])} |",
            f"| prediction by batch, img/s | {by(t['cuda_predict_batch_img_s'])} |",
            f"| bare step with cuDNN's algorithms picked by its heuristics / by timing them "
            f"(`cudnn.benchmark`), img/s | **{cudnn['off']}** / {cudnn['on']}: the engine leaves it off |",
        ]
        # The rows above each measured the same step once more: say how far they spread.
        same = [*t.get("bare_rounds", {}).get("channels_last_bf16", []), cudnn["off"]]
        same.append(t["cuda_bare_batch_img_s"][str(t["batch_size"])])
        lines += [
            "",
            f"Single figures move with the machine's load: the same step (channels_last bf16, batch "
            f"{t['batch_size']}, cuDNN's heuristics) measured {len(same)} times in this run gave "
            f"{min(same):,.0f} to {max(same):,.0f} img/s. Compare the figures within a row, measured "
            "side by side.",
        ]
    tests = _gpu_tests()
    if tests:
        lines += ["", f"`pytest -m gpu` in the same run: {tests}."]
    prof = outputs.get("step_profile_cuda")
    if prof and prof.get("cuda_graph"):
        lines += ["", _graphed_profile(prof, t)]
    elif prof:
        lines += [
            "",
            f"What holds the pipeline back (`bench/out/step_profile_cuda.json`, {_when(prof)}, "
            f"`bench/step_profile.py`: {prof['steps']} steps of {prof['batch_size']} under "
            f"`torch.profiler`, which slows the host too): the pipeline's {t['pipeline_img_s']:,.0f} img/s "
            f"{'reach' if t['pipeline_img_s'] >= GPU_GOAL_IMG_S else 'fall short of'} the "
            f"{GPU_GOAL_IMG_S:,} img/s set as the goal for an H100. The GPU was busy "
            f"**{prof['busy']}** of the time, its kernels {prof['kernel_ms_per_step']} ms a step (alone, they "
            f"would allow {prof['batch_size'] * 1000 / prof['kernel_ms_per_step']:,.0f} img/s); a step launches "
            f"{prof['kernels_per_step']:,.0f} kernels from {prof['ops_per_step']:,.0f} operations on the "
            "host. At this model's size the host's work for each operation, not the GPU's arithmetic, "
            "sets the pace; the bare step gains with the batch for the same reason. Replayed as CUDA "
            "graphs, the step leaves the host out (below).",
        ]
    for name in ("compile_check_cuda", "compile_check_cuda_graphs"):
        c = outputs.get(name)
        if c:
            lines += ["", _compile_line(c, name)]
    g = outputs.get("graph_step_cuda")
    if g:
        learns = (
            "the replays learn"
            if g["weights_changed"] and not g["nonfinite"]
            else "**the replays do not learn**"
        )
        lines += [
            "",
            f"The whole training step as one CUDA graph (`bench/out/graph_step_cuda.json`, {_when(g)}, "
            f"`bench/graph_step.py`: batch, augmentation, forward, loss, backward, AdamW; batch "
            f"{g['batch_size']}): **{g['graph_img_s']:,.0f} img/s** against the same step eager "
            f"{g['eager_img_s']:,.0f} (x{g['speedup']}), captured in {g['capture_s']} s; {learns} (loss "
            f"{g['first_replay_loss']} at the first replay, {g['last_replay_loss']} after {g['steps']}). "
            + _graph_variants(g, outputs.get("compile_check_cuda_graphs")),
        ]
    bq = outputs.get("batch_quality_cuda")
    if bq:
        lines += ["", batch_quality(bq)]
    return lines


def batch_quality(b: dict) -> str:
    """What a larger batch costs in quality (``bench/batch_quality.py``)."""
    lr = {"none": "", "sqrt": ", the learning rate scaled by the square root of the batch ratio",
          "linear": ", the learning rate scaled with the batch"}[b["lr_scale"]]  # fmt: skip
    rows = b["batches"]
    each = "; ".join(
        f"batch {r['batch_size']}: mIoU **{r['mean_miou']:.3f}** ({', '.join(f'{m:.3f}' for m in r['miou'])}), "
        f"{r['steps']:,} steps, {r['mean_seconds']} s, {r['mean_img_s']:,.0f} img/s over the whole run"
        for r in rows
    )
    first = rows[0]["batch_size"]
    diffs = "; ".join(
        f"batch {r['batch_size']} minus batch {first}, seed by seed: {r['paired_difference']:+.3f} on average"
        for r in rows[1:]
    )
    if b["seed_spread"]:
        diffs += f", where batch {first}'s mIoU moves by {b['seed_spread']:.3f} from seed to seed (standard deviation)"
    return (
        f"Batch size and quality (`bench/out/batch_quality_cuda.json`, {_when(b)}, {b['device']}, "
        f"`bench/batch_quality.py`: the `{b['preset']}` preset, {b['epochs']} epochs on {b['images']:,} "
        f"synthetic images, seeds {', '.join(map(str, b['seeds']))}, each run scored at its last epoch on the "
        f"same held-out split{lr}): {each}. {diffs[0].upper()}{diffs[1:]}."
    )


def _gpu_pipeline_row(t: dict) -> str:
    eager = t.get("cuda_pipeline_eager_img_s")
    if eager is None:  # measured before the engine replayed its steps as CUDA graphs
        return (
            f"| whole `fit()` pipeline, img/s | **{t['pipeline_img_s']}**: {t['ratio']} of the fastest bare "
            f"step{_spread(t)} |"
        )
    return (
        f"| whole `fit()` pipeline, each step replayed as one CUDA graph, img/s | **{t['pipeline_img_s']}**: "
        f"{t['ratio']}x the fastest bare step (run eagerly){_spread(t)}; the same pipeline with its steps run "
        f"eagerly (`cuda_graph = false`): {eager} (the graph **x{t['pipeline_img_s'] / eager:.2f}**) |"
    )


def _graphed_profile(prof: dict, t: dict) -> str:
    """What sets the pace once the host is out of the step: the kernels, by kind."""
    kernels = prof["top_kernels"]

    def kind(*words: str) -> tuple[float, float]:
        rows = [k for k in kernels if any(w in k["kernel"] for w in words)]
        return sum(k["ms_per_step"] for k in rows), sum(k["share"] for k in rows)

    bn, bn_share = kind("batch_norm")
    up, up_share = kind("upsample")
    conv, conv_share = kind("implicit_gemm", "ImplicitGemm", "conv")
    return (
        f"What holds the pipeline back (`bench/out/step_profile_cuda.json`, {_when(prof)}, "
        f"`bench/step_profile.py`: {prof['steps']} steps of {prof['batch_size']}, each replayed as one "
        f"CUDA graph, under `torch.profiler`): the pipeline's {t['pipeline_img_s']:,.0f} img/s "
        f"{'reach' if t['pipeline_img_s'] >= GPU_GOAL_IMG_S else 'fall short of'} the "
        f"{GPU_GOAL_IMG_S:,} img/s set as the goal for an H100. The host no longer sets the pace: the GPU "
        f"was busy **{prof['busy']}** of the time. Its kernels do: {prof['kernels_per_step']:,.0f} a step, "
        f"{prof['kernel_ms_per_step']} ms in all (alone, they allow "
        f"{prof['batch_size'] * 1000 / prof['kernel_ms_per_step']:,.0f} img/s). Among the "
        f"{len(kernels)} that take longest, batch norm's channels_last kernels take {bn:.2f} ms a step "
        f"({bn_share:.0%} of the GPU's time), bilinear upsampling and its backward {up:.2f} ms "
        f"({up_share:.0%}), and the convolutions' own kernels {conv:.2f} ms ({conv_share:.0%}). Each "
        "kernel reads and writes its tensor whole; fusing the normalisations and element-wise "
        "operations into fewer kernels is what `torch.compile` does, at the price of its compile time "
        "(below)."
    )


def _graph_variants(g: dict, compiled: dict | None) -> str:
    text = (
        "The engine replays its step the same way on a GPU (`cuda_graph`, on by default; one "
        "process, images in GPU memory)."
    )
    names = {
        "channels_last_bf16": "channels_last bf16 (the engine's)",
        "channels_last_fp32": "channels_last fp32 (TF32 convolutions)",
        "contiguous_bf16": "contiguous bf16",
        "channels_last_bf16_cudnn_benchmark": "channels_last bf16 with `cudnn.benchmark`",
        "channels_last_bf16_batch_x2": f"channels_last bf16 at batch {2 * g['batch_size']}",
        "channels_last_bf16_cudnn_batch_norm": "channels_last bf16 with cuDNN's batch norm",
    }
    v = g.get("variants_graph_img_s")
    if v:
        text += (
            " The replayed step in other forms, same run, img/s: "
            + "; ".join(f"{names.get(k, k)} {x:,.0f}" for k, x in v.items())
            + "."
        )
    for name, why in g.get("variants_failed", {}).items():
        said = names.get(name, name)
        text += f" {said[0].upper()}{said[1:]}: not counted ({why})."
    if g.get("batch_norm_backend"):
        text += (
            f" PyTorch picks its `{g['batch_norm_backend']}` batch norm kernels for the model's activations."
        )
    if compiled and compiled.get("compiled_img_s", 0) > g["graph_img_s"]:
        run_steps = _competition_run_steps(g.get("preset", "gpu"))
        per_step = g["batch_size"] / g["graph_img_s"] - compiled["batch_size"] / compiled["compiled_img_s"]
        pays = compiled["compile_s"] / per_step
        text += (
            f" `torch.compile(mode='reduce-overhead')` (above, another run: its model compiled, loss and "
            f"optimiser eager) made {compiled['compiled_img_s']:,.0f} img/s, faster than this graph: its "
            f"{compiled['compile_s']} s of compiling would pay back against the graph after about "
            f"{pays:,.0f} steps, {pays / run_steps:.1f} times the {run_steps:,} of a `{g.get('preset', 'gpu')}` "
            "preset run on the competition's 2,615 images."
        )
    return text


def _competition_run_steps(preset_name: str) -> int:
    """The steps of a run of ``preset_name`` on the competition's labelled images."""
    from trainer.config import preset
    from trainer.synth import COMPETITION_IMAGES

    cfg = preset(preset_name)
    return -(-int(COMPETITION_IMAGES * (1 - cfg.val_fraction)) // cfg.batch_size) * cfg.epochs


def _compile_line(c: dict, name: str) -> str:
    from trainer.config import preset

    cfg = preset(c.get("preset", "gpu"))
    steps = _competition_run_steps(c.get("preset", "gpu"))
    mode = c.get("mode", "default")
    what = "CUDA graphs replaying the step" if mode == "reduce-overhead" else "kernels fused by Inductor"
    verdict = (
        f"it pays back after {c['break_even_steps']:,} steps (a run of the `{c.get('preset', 'gpu')}` "
        f"preset's {cfg.epochs} epochs on the competition's 2,615 images makes {steps:,})"
        if c["break_even_steps"]
        else "it never pays back"
    )
    return (
        f"`torch.compile(mode={mode!r})`, {what} (`bench/out/{name}.json`, {_when(c)}, {c['device']}, "
        f"{c['precision']}, batch {c.get('batch_size', '-')}): compiled in {c['compile_s']} s; "
        f"{c['compiled_img_s']} img/s against eager {c['eager_img_s']} (**x{c['speedup']}**; the model "
        f"compiled, its loss and optimiser eager): {verdict}. "
        + (
            "The engine runs eager."
            if c["device"].startswith("CPU")
            else "The engine does not compile; on a GPU it replays its own CUDA graph of the step (below)."
        )
    )


def _gpu_tests() -> str | None:
    """The summary of the last ``pytest -m gpu`` that ``bench/gpu.sh`` logged, with the
    reasons for what it skipped."""
    path = OUT / "gpu_tests.log"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    summary = next(
        (line.strip("= ") for line in reversed(lines) if " in " in line and "passed" in line), None
    )
    if summary is None:
        return None
    skipped = [line.split(": ", 1)[1] for line in lines if line.startswith("SKIPPED") and ": " in line]
    return summary.split(" in ")[0] + (f" (skipped: {'; '.join(skipped)})" if skipped else "")


GPU_GOAL_IMG_S = 10_000
GPU_OUTPUTS = [
    "train_throughput_cuda",
    "step_profile_cuda",
    "compile_check_cuda",
    "compile_check_cuda_graphs",
    "graph_step_cuda",
    "batch_quality_cuda",
]


SECTIONS = [
    ("train_throughput", throughput),
    ("compile_check", compile_check),
    ("quality", quality),
    ("precision_quality", precision_quality),
    ("audit_models", audit_models),
    ("audit_quality", audit_quality),
    ("gui_responsiveness", gui),
    ("label_confidence", label_confidence),
    ("active_learning", active_learning),
    ("scale", scale),
    ("crop_rate", crop_rate),
    ("peer", peer),
]


def render() -> str:
    outputs = {name: data for name, _ in SECTIONS if (data := _load(name)) is not None}
    on_gpu = {name: d for name in GPU_OUTPUTS if (d := _load(name)) is not None}
    parts = [provenance(outputs, "the GPU's at the end" if on_gpu else None)] if outputs else []
    for name, fn in SECTIONS:
        if name in outputs:
            parts.append("\n".join(fn(outputs[name])))
        else:
            parts.append(f"`bench/{name}.py`: not measured in the latest `make bench` run.")
    parts.append("\n".join(gpu(on_gpu)))
    return "\n\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    readme = ROOT / "docs" / "figures.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"docs/figures.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if args.check:
        if new != text:
            print("docs/figures.md is out of date: run python bench/readme_figures.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
