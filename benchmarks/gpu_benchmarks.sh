#!/usr/bin/env bash
# Every GPU measurement the README and docs/results.md quote, as one script for one short GPU allocation
# (about 8 minutes on an H100/H200 for all parts; each part has its own time limit, so one part failing or running
# long costs only that part). Writes one text file per part (and the study's JSON) under OUT.
#
#   bash benchmarks/gpu_benchmarks.sh OUT [EMBED_RUN_DIR]      # EMBED_RUN_DIR: a run_dir whose embed stage holds the
#                                                           # DINOv2 embeddings of the digits (the paper's regime)
#   PARTS="recovery study" ROWS="wd 1e-2" bash benchmarks/gpu_benchmarks.sh OUT runs/dd   # only these parts / study rows
#   QUICK=1 bash benchmarks/gpu_benchmarks.sh /tmp/o runs/dd   # tiny sizes: checks the script itself (CPU is fine)
#
# The study's victims are cached in EMBED_RUN_DIR/victims: train them on a CPU first (their training is a Python
# loop of tiny steps, no faster on a GPU) with the same study command and --runs 1 --steps 1, then carry the folder.
# On the project's device machine: bash ../shared/device/prepare.sh here first, then run with carry [".whl", "runs/dd"]:
#   bash .whl/gpu-env.sh bash benchmarks/gpu_benchmarks.sh $OUT runs/dd
set -uo pipefail
out=${1:?usage: gpu_benchmarks.sh OUT [EMBED_RUN_DIR]}
embed=${2:-}
mkdir -p "$out"
py=${PYTHON:-python3}
parts=${PARTS:-memory end_to_end precision recovery study compile}
quick=${QUICK:-0}

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.txt, never stop the script
    local name=$1 limit=$2; shift 2
    [[ " $parts " == *" $name "* ]] || return 0
    [ "$quick" = 1 ] && limit=120
    echo "=== $name (limit ${limit}s): $*" | tee -a "$out/$name.txt"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$out/$name.txt" 2>&1
    echo "=== $name: exit $? after $((SECONDS - t0)) s" | tee -a "$out/$name.txt"
    tail -n 4 "$out/$name.txt"
}
size() { [ "$quick" = 1 ] && echo "$2" || echo "$1"; }  # size FULL QUICK

# 1. #12: peak memory per K for paper-sized victims (D = 768, 1024; n = 500, m = 1000)
part memory 60 $py benchmarks/bench_reconstruct.py --memory $(size "" "--memory-dims 64 --memory-runs 1 2")
# 2. #12: the Lightning stages against plain loops (end_to_end_ratio, victim_ratio): 64-1000-1000-1 victim, K = 64,
#    the benchmark's GPU default of 4000 steps; the victim side at 3000 epochs (its ratio does not depend on length)
part end_to_end 120 $py benchmarks/bench_reconstruct.py --end-to-end $(size "--epochs 3000 --repeats 1" "--steps 20 --runs 2 --epochs 50 --repeats 1")
# 3. #12: precision options (speed and accuracy against float64): float32, TF32, bf16 autocast
part precision 60 $py benchmarks/bench_precision.py --skip recovery $(size "" "--steps 2 --rounds 1") \
    --only "float32 (default),TF32 (matmul high),bf16-mixed"
# 4. #12: the recovery scenarios under TF32 and torch.compile (the options' verdicts need them)
part recovery 100 $py benchmarks/bench_precision.py --skip speed accuracy --only "float32 (default),TF32 (matmul high),compile"
# 5. #11: the paper's regime at GPU budget: DINOv2 embeddings of the digits, the default victim (weight decay 1e-2,
#    lr cosine-decayed: nearer a stationary point) and the previous default (lr 0.5 constant), 64 runs each
if [ -n "$embed" ]; then
    part study 170 $py benchmarks/study_reconstruct.py --embeddings "$embed" --scale gpu --rows "${ROWS:-wd 1e-2,previous default victim (lr 0.5}" \
        --victim-epochs 50000 --victim-cache "$embed/victims" $(size "--runs 64 --steps 30000 --budget-s 155" "--runs 2 --steps 100") \
        --out "$out/study.json"
fi
# 6. #12: torch.compile of the step on the GPU, alone and with TF32 (last: compilation time is unpredictable)
part compile 60 $py benchmarks/bench_precision.py --skip recovery $(size "" "--steps 2 --rounds 1") \
    --only "float32 (default),compile,TF32 + compile"
