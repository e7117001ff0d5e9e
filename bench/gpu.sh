#!/usr/bin/env bash
# The CUDA checks and the GPU's figures in one go, on a machine with an NVIDIA GPU:
#
#     bash bench/gpu.sh [OUTDIR]      # default bench/out; PYTHON=... picks the interpreter
#
# pytest -m gpu, then train_throughput, step_profile and compile_check with --device cuda,
# graph_step (the whole training step as one CUDA graph) and batch_quality (the gpu preset's
# mIoU at batch 128 and 256), their JSON in OUTDIR as
# *_cuda.json, and what each printed in OUTDIR/gpu.log (the tests' also in gpu_tests.log).
# Each part has a time limit of its own, so that one that hangs or fails leaves the others
# their turn; the exit status is the first failure's.
# GPU_PARTS="gpu_tests step_profile_cuda" runs only the parts named.
set -u
out=$(mkdir -p "${1:-bench/out}" && cd "${1:-bench/out}" && pwd)
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
part() {  # part SECONDS NAME COMMAND...: run, add its output to OUTDIR/gpu.log, remember a failure
    local limit=$1 name=$2 t0=$SECONDS log
    shift 2
    case " ${GPU_PARTS:-$name} " in *" $name "*) ;; *) return ;; esac
    echo "== $name"
    log=$(mktemp)
    (cd "$root" && timeout "$limit" "$@") >"$log" 2>&1
    local rc=$?
    tail -n 25 "$log"
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    { echo "== $name: exit $rc after $((SECONDS - t0)) s"; cat "$log"; } >>"$out/gpu.log"
    # The tests' own log: the README quotes its summary.
    [ "$name" = gpu_tests ] && cp "$log" "$out/gpu_tests.log"
    rm -f "$log"
    [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
part 240 gpu_tests $py -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    -o "filterwarnings=error::DeprecationWarning:trainer.*"
part 300 train_throughput_cuda $py bench/train_throughput.py --device cuda --json "$out/train_throughput_cuda.json"
part 120 step_profile_cuda $py bench/step_profile.py --device cuda --json "$out/step_profile_cuda.json"
part 200 graph_step_cuda $py bench/graph_step.py --variants --json "$out/graph_step_cuda.json"
part 300 batch_quality_cuda $py bench/batch_quality.py --device cuda --json "$out/batch_quality_cuda.json"
part 240 compile_check_cuda $py bench/compile_check.py --device cuda --steps 50 --json "$out/compile_check_cuda.json"
part 240 compile_check_cuda_graphs $py bench/compile_check.py --device cuda --steps 50 --mode reduce-overhead \
    --json "$out/compile_check_cuda_graphs.json"
exit $status
