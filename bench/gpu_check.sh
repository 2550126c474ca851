#!/usr/bin/env bash
# Everything that needs a GPU, in one call (≤ 8 minutes on one H100/H200), each part under its own timeout:
#
#   bash bench/gpu_check.sh                 # writes gpu_check/summary.md and one log per part
#   bash bench/gpu_check.sh --out DIR       # another folder
#   bash bench/gpu_check.sh --dry-run       # on a CPU: check that every command parses (pytest collects, each
#                                           # script accepts its options), run nothing
#
# Parts: the Triton kernels' tests compiled (TRITON_INTERPRET=0, so tests/conftest.py does not switch on the
# interpreter; the GPU-only tests included), the fused training step against the materialised one on CUDA, the
# kernel benchmark at N = 8192 × V ∈ {128256, 151936}, training throughput and MFU at Qwen2.5-1.5B dimensions, one
# OREO step of ours vs an official-style step at those dimensions, and generation vs transformers on CUDA.
# A part that fails or times out is marked so in the summary; the others still run. Exit status: 0 if all passed.
set -u
cd "$(dirname "$0")/.."
OUT=gpu_check
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"

# name | seconds allowed | command
Q=qwen2.5-1.5b
PARTS=(
    "test_kernels|90|python -m pytest -q -rs tests/test_kernels.py"
    "test_fused_step_gpu|30|python -m pytest -q -rs tests/test_fused_step.py -k gpu"
    "kernels_bench|80|python bench/kernels_vs_naive.py --shapes 8192x128256,8192x151936 --no-compile --out $OUT/k.json"
    "train_throughput|60|python bench/train_throughput.py --device cuda --preset $Q --grad-checkpointing --steps 3"
    "step_vs_official|130|python bench/step_vs_official.py --preset $Q --timeout 62"
    "generate_vs_hf|60|python bench/generate_vs_hf.py --device cuda --preset $Q --batches 1,16 --iters 2 --no-compile"
)

# Dry run: the command's own argument parser runs on its options and stops there (exit 2 on a bad option).
parse_only() {
    python - "$@" <<'EOF'
import argparse, os, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))  # as when the script runs itself
runpy.run_path(sys.argv[0], run_name="__main__")
EOF
}

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    if [ $DRY = 1 ]; then echo "dry run (commands parsed, nothing run)"; else
        python -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}, " +
            (torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE"))'
    fi
    echo
} > "$SUMMARY"

status=0
for part in "${PARTS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$part"
    log="$OUT/$name.log"
    start=$(date +%s)
    if [ $DRY = 1 ]; then
        read -r -a words <<< "$cmd"
        if [ "${words[1]}" = "-m" ]; then
            python "${words[@]:1}" --collect-only > "$log" 2>&1   # pytest: collect only
        else
            parse_only "${words[@]:1}" > "$log" 2>&1
        fi
        rc=$?
    else
        # TRITON_INTERPRET=0: compiled kernels whatever the environment says; -k 10: SIGKILL if SIGTERM is ignored
        TRITON_INTERPRET=0 timeout -k 10 "$limit" $cmd > "$log" 2>&1
        rc=$?
    fi
    seconds=$(( $(date +%s) - start ))
    case $rc in
        0) verdict=ok ;;
        124|137) verdict="TIMEOUT after ${limit} s" ;;
        *) verdict="FAILED (exit $rc)" ;;
    esac
    [ $rc = 0 ] || status=1
    if [ $DRY = 0 ] && grep -q "skipped" "$log"; then verdict="$verdict, with SKIPPED tests"; status=1; fi
    echo "$name: $verdict (${seconds} s)" >&2
    {
        echo "## $name: $verdict, ${seconds} s"
        echo
        echo '```'
        echo "\$ $cmd"
        if [ $DRY = 1 ]; then tail -n 3 "$log"; else tail -n 40 "$log"; fi
        echo '```'
        echo
    } >> "$SUMMARY"
done
echo "summary: $SUMMARY" >&2
exit $status
