#!/usr/bin/env bash
# The GPU measurements of the README, as run on a lent GPU machine (one H100, 16 cores) whose
# image has torch but neither this package's other dependencies nor internet: wheels are
# carried in WHEELS (pip download ... -d WHEELS, see the commands in the README's performance
# section) and installed into /tmp/site.
#
#   bash benchmarks/gpu.sh bench OUT_DIR WHEELS DSB_IMAGES   # bare model (bf16, channels-last), then benchmarks/gpu_bench.py: segment
#                                                              # on a 20480² mosaic, 475 fields and a 65536² slide with nvidia-smi dmon,
#                                                              # device vs CPU instance labels; VAL_DATA=DIR adds the validation mAP
#   bash benchmarks/gpu.sh train OUT_DIR WHEELS TRAIN_DATA    # the shipped model's training run (--engine local --gpu)
#   bash benchmarks/gpu.sh train-he OUT_DIR WHEELS HE_DATA    # the he model's recipe on a GPU: HE_DATA holds monuseg/,
#                                                              # dsb_stained/ (images/ + labels/) and val.txt, as
#                                                              # benchmarks/pack_he.py makes it (25.5 MiB: read its docstring
#                                                              # for the 64 MiB that a device call may carry)
#   bash benchmarks/gpu.sh profile OUT_DIR WHEELS DSB_IMAGES  # after bench: py-spy profiles of segment on both workloads
#                                                              # (WHEELS with py-spy), and their summaries
#
# TRAIN_DATA was made by benchmarks/pack_grey.py; the returned bundle was tuned by
# benchmarks/retune_bundle.py (post-processing thresholds, on the CPU).
#
# Each step has its own time limit so that one slow step cannot eat the others' time.
set -uo pipefail
mode=$1 out=$2 wheels=$3 data=$4
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$repo PYTHONUNBUFFERED=1
cd "$repo"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/machine.txt"
python3 -c "import torch, zarr, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'zarr', zarr.__version__, 'smp', smp.__version__, 'cpus', __import__('os').cpu_count())" 2>&1 | tee -a "$out/machine.txt"

if [ "$mode" = bench ]; then
    # issue 20's figures (benchmarks/gpu_bench.py builds its workloads from DSB_IMAGES: the
    # 20480² mosaic of real fields, 475 fields, a 65536² synthetic slide); 8 minutes in all
    if [ "${BARE:-1}" = 1 ]; then  # BARE=0 skips the bare network
        timeout 50 python3 benchmarks/bare_model.py --device cuda --batch-sizes 16 32 --seconds 1 \
            --variants bf16-cl 2>&1 | tee "$out/bare_model.txt"
    fi
    timeout 400 python3 benchmarks/gpu_bench.py --fields "$data" --out "$out" --budget 370 2>&1 | tee "$out/gpu_bench.txt"
    # the GPU's instance labels against scikit-image's on the validation images: mAP and seconds
    if [ -d "${VAL_DATA:-}" ]; then
        timeout 60 python3 benchmarks/instances_device.py --device cuda --data "$VAL_DATA" --levels 16 2>&1 | tee "$out/instances_device.txt"
    fi
elif [ "$mode" = profile ]; then
    # where the time of a run goes, per process and thread (benchmarks/spy_summary.py reads it)
    for workload in mosaic fields; do
        timeout 60 /tmp/site/bin/py-spy record --subprocesses --threads --idle --format raw --rate 100 -o "/tmp/spy_$workload.txt" -- \
            python3 -m nucleibatch segment /tmp/gpu_bench/$workload -o /tmp/spy-$workload --device cuda --progress log \
            >> /tmp/spy.log 2>&1
        gzip -c "/tmp/spy_$workload.txt" > "$out/spy_$workload.txt.gz"
        python3 benchmarks/spy_summary.py "/tmp/spy_$workload.txt" --top 6 > "$out/spy_${workload}_summary.txt" 2>&1
    done
elif [ "$mode" = train ]; then
    # the default model's recipe on one GPU: 40 patches of 256 px per training image per epoch
    timeout 360 python3 -m nucleibatch train "$data" -o /tmp/run-default --engine local --gpu \
        --epochs 20 --batch-size 32 --patches-per-epoch 19640 --loader-workers 14 --overlay-every 6 \
        --no-tune --seed 0 2>&1 | tee "$out/train.log"
    if [ ! -f /tmp/run-default/bundle/model.safetensors ]; then
        # out of time: export the best of the epochs that finished (same run, fewer epochs)
        done_epochs=$(($(wc -l < /tmp/run-default/metrics.csv) - 1))
        echo "timed out: exporting the best of $done_epochs finished epochs" | tee -a "$out/train.log"
        timeout 60 python3 -m nucleibatch train "$data" -o /tmp/run-default --engine local --gpu \
            --epochs "$done_epochs" --batch-size 32 --patches-per-epoch 19640 --loader-workers 14 --overlay-every 6 \
            --no-tune --seed 0 2>&1 | tail -5 | tee -a "$out/train.log"
    fi
    cp /tmp/run-default/metrics.csv /tmp/run-default/curves.png /tmp/run-default/train_settings.json "$out/" 2>/dev/null
    # model.safetensors is larger than one returned file may be: split, joined again here
    (cd /tmp/run-default/bundle && split -b 15M model.safetensors "$out/model.safetensors.part-" && cp config.json "$out/bundle_config.json")
elif [ "$mode" = train-he ]; then
    # the he model's CPU recipe (docs/performance.md) with 8x the patches per epoch, on one GPU
    timeout 420 python3 -m nucleibatch train "$data/monuseg" "$data/dsb_stained" -o /tmp/run-he --engine local --gpu \
        --init default --input haematoxylin --val-images "$data/val.txt" --pixel-size 0.25 --blur 0.2 \
        --licence CC-BY-NC-SA-4.0 --citation "Kumar et al., IEEE TMI 2017 and 2019 (MoNuSeg)" \
        --epochs 24 --batch-size 32 --patches-per-epoch 19200 --lr 5e-4 --loader-workers 14 --overlay-every 6 --seed 0 \
        2>&1 | tee "$out/train_he.log"
    cp /tmp/run-he/metrics.csv /tmp/run-he/curves.png /tmp/run-he/train_settings.json "$out/" 2>/dev/null
    (cd /tmp/run-he/bundle && split -b 15M model.safetensors "$out/model.safetensors.part-" && cp config.json "$out/bundle_config.json")
fi
