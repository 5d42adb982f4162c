#!/usr/bin/env bash
# Intra-inter clustering's arms on the phantom (docs/reproducing.md, "Intra-inter clustering"): for
# N seeds, the released schedule (stage 1 = 2D SwAV, the intra part; stage 2 = + masked
# slice-embedding prediction; stage 3 = + 3D cluster agreement) and the joint objective, each
# encoder probed at scan level from the mean of its slice features and, where it has one, from its
# slice transformer's volume feature, and segmented slice-wise with the 2D decoder (Dice per
# volume); a random-init encoder alongside. Writes OUT_DIR/report.md.
#
# Usage: scripts/compare_intra_inter.sh [OUT_DIR] [NUM_SEEDS]
#   OUT_DIR    folder for every run and the report (default: runs/compare_intra_inter)
#   NUM_SEEDS  seeds (default: 3)
# Environment:
#   VARIANT    size of every run (default: compare, the comparison's settings; 'tiny' for a smoke
#              run); the evaluations use the same variant of configs/linear_eval.py and segment.py.
#   STEPS      steps of stage 2, stage 3 and the joint run (default: the configs' own)
#   SWAV_FROM  a folder holding swav_seed<S> pretraining runs of the same variant (e.g. the 2D
#              comparison's OUT/pretrain): those are stage 1, instead of training it again here.
#   EXTRA      more --config.* overrides, applied to every run (data and encoder must match)
#   PYTHON     the Python interpreter (default: python)
# A run whose folder holds its result (backbone.msgpack or eval.json) is not repeated
# (scripts/run_once.sh), so an interrupted comparison can be restarted.
set -euo pipefail

out_dir=${1:-runs/compare_intra_inter}
num_seeds=${2:-3}
variant=${VARIANT-compare}
size=${variant:+,${variant}}      # intra_inter.py:<stage>,<size>
suffix=${variant:+:${variant}}    # the evaluation files' variant
python=${PYTHON:-python}
read -r -a extra <<< "${EXTRA:-}"
steps=()
if [[ -n "${STEPS:-}" ]]; then
  steps+=(--config.train.num_steps="${STEPS}")
fi

# shellcheck source=scripts/run_once.sh
source "$(dirname "$0")/run_once.sh"

# The scan features probed per arm. Stage 2 keeps stage 1's encoder (frozen), so its
# mean-of-slices probe would repeat stage 1's; SwAV and random init have no slice transformer.
declare -A features=([intra]=mean [mask]=slice_transformer [inter]='mean slice_transformer'
                     [joint]='mean slice_transformer' [random]=mean)

mkdir -p "${out_dir}"
eval_dirs=()
for seed in $(seq 0 $((num_seeds - 1))); do
  seed_arg=(--config.seed="${seed}")
  pre="${out_dir}/pretrain"
  intra="${pre}/intra_seed${seed}"
  if [[ -n "${SWAV_FROM:-}" ]]; then
    intra="${SWAV_FROM}/swav_seed${seed}"
    [[ -f "${intra}/backbone.msgpack" ]] || { echo "no stage 1 in ${intra}" >&2; exit 1; }
  fi
  run_once "intra_inter.py:stage1${size}" "${intra}" "${seed_arg[@]}"
  run_once "intra_inter.py:stage2${size}" "${pre}/mask_seed${seed}" "${seed_arg[@]}" \
    "${steps[@]}" --config.init_from="${intra}"
  run_once "intra_inter.py:stage3${size}" "${pre}/inter_seed${seed}" "${seed_arg[@]}" \
    "${steps[@]}" --config.init_from="${pre}/mask_seed${seed}"
  run_once "intra_inter.py:joint${size}" "${pre}/joint_seed${seed}" "${seed_arg[@]}" \
    "${steps[@]}" --config.init_from=

  for arm in intra mask inter joint random; do
    init_from=""
    if [[ "${arm}" == intra ]]; then
      init_from=${intra}
    elif [[ "${arm}" != random ]]; then
      init_from="${pre}/${arm}_seed${seed}"
    fi
    for feature in ${features[${arm}]}; do
      workdir="${out_dir}/eval/linear_${feature}_${arm}_seed${seed}"
      run_once "linear_eval.py${suffix}" "${workdir}" "${seed_arg[@]}" \
        --config.init_from="${init_from}" --config.evaluate.level=scan \
        --config.evaluate.scan_features="${feature}"
      eval_dirs+=("${workdir}")
    done
    if [[ "${arm}" != mask ]]; then
      workdir="${out_dir}/eval/segment_${arm}_seed${seed}"
      run_once "segment.py${suffix}" "${workdir}" "${seed_arg[@]}" --config.init_from="${init_from}"
      eval_dirs+=("${workdir}")
    fi
  done
done

printf '%s\n' "${eval_dirs[@]}" > "${out_dir}/runs.txt"
"${python}" -m dsset.compare "${eval_dirs[@]}" --out="${out_dir}/report.md"
echo "Report: ${out_dir}/report.md"
