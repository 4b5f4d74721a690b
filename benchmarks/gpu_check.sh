#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md, in one run of a few minutes:
#   1. benchmarks/train_step.py, ResNet-50 at 224 px, batch 64 and 256: the default path
#      (bf16 autocast, channels_last, fused SGD, no key decoder) against the original's costs,
#      with FLOPs counted for model FLOPs utilisation (MFU against the dense bf16 peak).
#   1b. the compiled step at the first batch size: the encoders and decoders compiled (what
#      --torch_compile trains), then the whole model; and the one-process shuffle-BN emulation
#      (shuffle_bn_splits=2 against =1, paired steps in one process).
#   2. gradient checkpointing at 512 px, batch 32: peak memory and step time with and without.
#   3. a real pre-training run from 1024 x 1024 PNG phantoms (the loader decodes, crops and
#      ships uint8 views; the GPU augments and trains), logging the fraction of time the
#      training loop waited for data, with `nvidia-smi dmon` sampling GPU utilisation.
#
#   OUT=gpu_out bash benchmarks/gpu_check.sh            # the full check
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_check.sh  # tiny sizes, CPU: the script itself
#
# Writes log.txt, dmon.txt and trainer_state.json to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
PEAK=${PEAK_TFLOPS:-989}  # H100 / H200 SXM dense bf16, by the vendor's datasheet
if [ "${SMOKE:-0}" = 1 ]; then
  SIZES=(8 16) IMG=64 ENC=resnet18 CKPT_IMG=128 CKPT_B=2 STEPS=2 WARM=1 PAIRED=3
  NPNG=48 PNG=256 TRAIN_STEPS=6 WORKERS=1 TRAIN_B=8 QUEUE=256
else
  SIZES=(64 256) IMG=224 ENC=resnet50 CKPT_IMG=512 CKPT_B=32 STEPS=10 WARM=3 PAIRED=30
  NPNG=1536 PNG=1024 TRAIN_STEPS=300 WORKERS=${WORKERS:-15} TRAIN_B=64 QUEUE=65536
fi
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
run() { "$@" 2>&1 | tee -a "$OUT/log.txt"; }

log "device"
run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
run "$PY" -c "import torch, transformers, accelerate, segmentation_models_pytorch as smp; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, \
'accelerate', accelerate.__version__, 'smp', smp.__version__, 'cpus', __import__('os').cpu_count())"

B=("$PY" benchmarks/train_step.py --encoder "$ENC" --image-size "$IMG" --steps "$STEPS"
   --warmup "$WARM" --count-flops --peak-tflops "$PEAK" --queue-size 65536)
for batch in "${SIZES[@]}"; do
  log "train_step $ENC ${IMG}px batch $batch, default vs baseline"
  run "${B[@]}" --batch-size "$batch" --mode both
done
log "compiled step, $ENC ${IMG}px batch ${SIZES[0]}: encoders and decoders, then the whole model"
run "${B[@]}" --batch-size "${SIZES[0]}" --mode default --compile parts
run "${B[@]}" --batch-size "${SIZES[0]}" --mode default --compile whole
log "one-process shuffle-BN emulation, ${SIZES[0]} images: shuffle_bn_splits=2 against =1, paired"
run "$PY" benchmarks/train_step.py --encoder "$ENC" --image-size "$IMG" --batch-size "${SIZES[0]}" \
  --queue-size 65536 --mode splits-paired --steps "$PAIRED" --warmup "$WARM"
C=("$PY" benchmarks/train_step.py --encoder "$ENC" --image-size "$CKPT_IMG" --batch-size "$CKPT_B"
   --steps "$STEPS" --warmup "$WARM" --mode default)
log "gradient checkpointing, ${CKPT_IMG}px batch $CKPT_B"
run "${C[@]}"
run "${C[@]}" --gradient-checkpointing

log "pre-training from $NPNG PNG phantoms of ${PNG}px, $WORKERS loader workers"
DATA=$(mktemp -d)
run "$PY" - "$DATA" "$NPNG" "$PNG" <<'EOF'
import sys, time
from multiprocessing import Pool
from PIL import Image
from caid_hf.data.sources import PhantomSource

folder, num, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
source = PhantomSource(num, size=size, seed=0)

def write(i):
    Image.fromarray(source.load(i)).save(f"{folder}/phantom_{i:05d}.png")

start = time.perf_counter()
with Pool() as pool:
    pool.map(write, range(num), chunksize=8)
print(f"wrote {num} PNGs of {size}px in {time.perf_counter() - start:.1f} s")
EOF
nvidia-smi dmon -s u -d 1 > "$OUT/dmon.txt" 2>&1 &
DMON=$!
run "$PY" -m caid_hf.cli pretrain --encoder_name "$ENC" --image_size "$IMG" \
  --queue_size "$QUEUE" --train_source "$DATA" --validation_fraction 0.05 \
  --per_device_train_batch_size "$TRAIN_B" --max_steps "$TRAIN_STEPS" --num_train_epochs 100 \
  --logging_steps 10 --save_total_limit 1 --dataloader_num_workers "$WORKERS" \
  --report_to none --output_dir "$DATA/run"
kill "$DMON" 2>/dev/null
cp "$DATA/run/trainer_state.json" "$OUT/" 2>/dev/null
run "$PY" - "$OUT/trainer_state.json" <<'EOF'
import json, statistics, sys
state = json.load(open(sys.argv[1]))
rows = [h for h in state["history"] if "train/images_per_second" in h][1:]  # first: start-up
for h in rows:
    print(f"step {h['step']:4d}: {h['train/images_per_second']:8.1f} images/s, "
          f"data wait {h['train/data_wait_fraction']:.1%}")
if rows:
    print(f"median after start-up: {statistics.median(h['train/images_per_second'] for h in rows):.1f} "
          f"images/s, data wait {statistics.median(h['train/data_wait_fraction'] for h in rows):.1%}; "
          f"training time {state.get('training_time_s')} s, {state.get('hardware')}")
EOF
rm -rf "$DATA"
