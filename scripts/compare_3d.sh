#!/usr/bin/env bash
# The 3D arm of the comparison: pretrains each 3D proxy task (Taleb et al.) on the phantom for N
# seeds, then fine-tunes segment3d at 10 % and 100 % of the labelled train scans and runs the
# scan-level 3D linear probe, from each task's encoder and from a random-init one, and builds the
# report. See docs/reproducing.md, "3D proxy tasks".
#
# Usage: scripts/compare_3d.sh [OUT_DIR] [NUM_SEEDS]
#   OUT_DIR    folder for every run and the report (default: runs/compare3d)
#   NUM_SEEDS  seeds per arm (default: 3)
# Environment:
#   VARIANT         config variant of every run (default: none, the configs' own defaults; 'tiny'
#                   for a smoke run)
#   METHODS         the pretraining configs (default: rotation3d rpl3d jigsaw3d cpc3d exemplar3d)
#   PRETRAIN_STEPS  pretraining steps of every task (default: each config's)
#   SEGMENT_STEPS   segment3d steps (default: the config's)
#   EXTRA           more --config.* overrides, applied to every run (data and encoder must match)
#   PYTHON          the Python interpreter (default: python)
set -euo pipefail

out_dir=${1:-runs/compare3d}
num_seeds=${2:-3}
suffix=${VARIANT:+:${VARIANT}}
python=${PYTHON:-python}
read -r -a extra <<< "${EXTRA:-}"
read -r -a methods <<< "${METHODS:-rotation3d rpl3d jigsaw3d cpc3d exemplar3d}"
pretrain=()
if [[ -n "${PRETRAIN_STEPS:-}" ]]; then
  pretrain+=(--config.train.num_steps="${PRETRAIN_STEPS}")
fi
segment=()
if [[ -n "${SEGMENT_STEPS:-}" ]]; then
  segment+=(--config.train.num_steps="${SEGMENT_STEPS}")
fi

# shellcheck source=scripts/run_once.sh
source "$(dirname "$0")/run_once.sh"
run() {  # run CONFIG WORKDIR ARGS...: configs/CONFIG.py with this script's variant
  local config=$1
  shift
  run_once "${config}.py${suffix}" "$@"
}

mkdir -p "${out_dir}"
eval_dirs=()
for seed in $(seq 0 $((num_seeds - 1))); do
  for init in "${methods[@]}" random; do
    init_from=""
    if [[ "${init}" != random ]]; then
      init_from="${out_dir}/pretrain/${init}_seed${seed}"
      run "${init}" "${init_from}" --config.seed="${seed}" "${pretrain[@]}"
    fi
    for fraction in 0.1 1.0; do
      workdir="${out_dir}/eval/segment3d_${init}_labels${fraction}_seed${seed}"
      run segment3d "${workdir}" --config.seed="${seed}" --config.init_from="${init_from}" \
        --config.evaluate.label_fraction="${fraction}" "${segment[@]}"
      eval_dirs+=("${workdir}")
    done
    workdir="${out_dir}/eval/linear3d_${init}_seed${seed}"
    run linear_eval3d "${workdir}" --config.seed="${seed}" --config.init_from="${init_from}"
    eval_dirs+=("${workdir}")
  done
done

# The report's run folders, one a line: scripts/compare_methods.sh (ARMS='2d 3d') reads them.
printf '%s\n' "${eval_dirs[@]}" > "${out_dir}/runs.txt"
"${python}" -m dsset.compare "${eval_dirs[@]}" --out="${out_dir}/report.md"
echo "Report: ${out_dir}/report.md"
