#!/usr/bin/env bash
# GPU check: what synthfactory does on one lent GPU, in under 10 minutes.
#
#   benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_check
#
# 1. Training throughput at 64 px, logical batch 256 (the MRI recipe's GPU model, [64,128,128]):
#    non-private, vmap, mixed_ghost and Opacus hooks, at K = 1 and 4, in fp32 and in bf16 autocast.
# 2. Sampling throughput (DDIM, the recipe's 25 steps), fp32 and bf16.
# 3. The gate's searches: exact pixel L2 at 20,000 x 20,000 (64 px, on the GPU) against faiss-cpu,
#    and each similarity space at 2,000 x 2,000 (32 px).
# It writes OUT_DIR/gpu_check.json (every figure) and OUT_DIR/gpu_check.md (short tables), with
# each part's own log. Each part has a time limit; a part that runs out is reported as such and
# the others still run. GPU_CHECK_CPU_SMOKE=1 runs a tiny version on the CPU (checks the script).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}

if [ "${GPU_CHECK_CPU_SMOKE:-0}" = 1 ]; then
  DEVICE=cpu; SIZE=16; CH="[8,16,16]"; NG=4; BATCH=8; PHYS=8; SN=16; SB=8; AN=300; ASN=40; ASS=16; T=5
else
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible to torch ($PY); nothing measured" >&2
    exit 2
  fi
  DEVICE=cuda; SIZE=64; CH="[64,128,128]"; NG=8; BATCH=256; PHYS=256; SN=1024; SB=256; AN=20000; ASN=2000; ASS=32; T=1
fi
SETS=(--set "data.image_size=$SIZE" --set "model.block_out_channels=$CH" --set "model.norm_num_groups=$NG")
RECIPE=recipes/mri_brain_tumor.yaml

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import torch, diffusers, opacus; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'opacus', opacus.__version__)"; } > "$OUT_DIR/env.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run with a time limit (x T), log it, record its exit status
  local name=$1 limit=$(( $2 * T )); shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  echo $? > "$OUT_DIR/$name.rc"
  tail -n 14 "$OUT_DIR/$name.log"
}

TRAIN=("$PY" benchmarks/train_throughput.py --recipe "$RECIPE" "${SETS[@]}" --device "$DEVICE"
       --batch "$BATCH" --physical "$PHYS" --ks 1,4 --modes nonprivate,vmap,mixed_ghost,hooks
       --steps 3 --windows 2 --warmup 1)
part train_fp32 180 "${TRAIN[@]}" --json "$OUT_DIR/train_fp32.json"
part train_bf16 150 "${TRAIN[@]}" --bf16 --json "$OUT_DIR/train_bf16.json"

SAMPLE=("$PY" benchmarks/sample_throughput.py --recipe "$RECIPE" "${SETS[@]}" --device "$DEVICE"
        --n "$SN" --batch "$SB")
part sample_fp32 60 "${SAMPLE[@]}" --json "$OUT_DIR/sample_fp32.json"
part sample_bf16 60 "${SAMPLE[@]}" --bf16 --json "$OUT_DIR/sample_bf16.json"

part audit 120 "$PY" benchmarks/audit_throughput.py --n "$AN" --size "$SIZE" --space-n "$ASN" \
  --space-size "$ASS" --json "$OUT_DIR/audit.json"

"$PY" benchmarks/gpu_check_summary.py "$OUT_DIR"
