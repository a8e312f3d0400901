#!/usr/bin/env bash
# The GPU measurement of training speed (README, "Training fast on a GPU"), in one call of the device tool: about 8 minutes
# on an H100 (each step has its own timeout, so a slow step cannot eat the others' time). Preparation and
# the exact call: benchmarks/gpu_session.md. Tables go to stdout and to $OUT/*.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
DATA=data
BENCH="python3 benchmarks/train_throughput.py --data-dir $DATA"
step() { echo; echo "== $(date +%T) $*"; }

step "device and software"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cpus: $(nproc)"
python3 -c 'import torch, pytorch_lightning, timm, hydra; print("torch", torch.__version__, "lightning", pytorch_lightning.__version__, "timm", timm.__version__, "hydra", hydra.__version__)' || exit 1

step "synthetic data set (3,350 images, ~15 s)"
timeout 120 python3 -m reidreg.data.synthetic --out "$DATA" | tail -1

# (c) first: the targets (bot_r50 >= 3,000 img/s, AdaptiveReID >= 1,700 img/s in bf16) and each
# regularizer's overhead, through the Lightning module, on device-augmented batches.
step "(c) reidreg training steps, bf16-mixed, every regularizer (~3 min)"
timeout 230 $BENCH --sections module --precisions bf16-mixed --rounds 3 --steps 10 \
    --regularizers none,constant_l2,adaptive_l2,sgp,sgsl,adversarial --out "$OUT/module.md" 2>&1 \
    | grep -v -e "GPU available" -e "TPU available" -e "LitLogger" -e "max_steps=" -e "LOCAL_RANK"

step "(b) training DataLoader alone: per-image CPU path vs cache + batch augment (~1 min)"
timeout 120 $BENCH --sections loader --workers 12,16 --rounds 3 --steps 10 --out "$OUT/loader.md"

step "(a) the network alone: precision x channels-last x fused Adam x compile (~2.5 min)"
timeout 200 $BENCH --sections network --rounds 3 --steps 10 \
    --variants fp32,bf16,bf16+cl,bf16+cl+fused,bf16+cl+fused+compile,fp16+cl --out "$OUT/network.md"

# End to end: 200 real steps of each preset through the CLI, run.json's performance block.
step "end to end: python -m reidreg.train, 200 steps per preset (~1 min)"
for preset in bot_r50 adaptivereid_market1501; do
    run_dir=/tmp/e2e_$preset  # not under $OUT: checkpoints are too large to come back
    rm -rf "$run_dir"  # a finished run there would be skipped, not measured again
    timeout 120 python3 -m reidreg.train experiment=$preset dataset=synthetic backbone.pretrained=false \
        data.pipeline=gpu data.num_workers=12 data.steps_per_epoch=200 data.val_identities=0 \
        trainer.max_epochs=1 trainer.precision=auto test=false progress.mode=lines checkpoint.every_n_steps=0 \
        logger=csv paths.output_dir="$run_dir" > "$OUT/e2e_$preset.log" 2>&1 || tail -5 "$OUT/e2e_$preset.log"
    cp "$run_dir/run.json" "$OUT/e2e_${preset}_run.json" 2>/dev/null
    python3 -c "import json, sys; print(sys.argv[1], json.load(open(sys.argv[2]))['performance'])" \
        "$preset" "$run_dir/run.json" 2>/dev/null || echo "$preset: no run.json performance"
done
step "done"
