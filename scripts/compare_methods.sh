#!/usr/bin/env bash
# Pretrains SimCLR, PS-SimCLR (perscan), DS-SimCLR (deepset), SwAV and DeepCluster-v2 on the phantom
# for N seeds, adds a random-init baseline, runs the scan-level linear probe on every encoder, and
# builds the comparison report. With ARMS='2d 3d' it also runs the 3D arm (scripts/compare_3d.sh:
# the five 3D proxy tasks and a random-init 3D U-Net, segment3d and the 3D probe) into OUT_DIR/3d
# and puts both arms in one report. See docs/reproducing.md.
#
# Usage: scripts/compare_methods.sh [OUT_DIR] [NUM_SEEDS]
#   OUT_DIR    folder for every run and the report (default: runs/compare)
#   NUM_SEEDS  seeds per method (default: 3)
# Environment:
#   METHODS  the 2D pretraining methods (default: 'simclr perscan deepset swav deepcluster_v2');
#            random init always runs.
#   VARIANT  the config variant of every run (default: compare, the comparison's settings chosen on
#            the validation split, configs/base.py:compare_settings - today the quick start's;
#            'tiny' for a smoke run; set but empty, VARIANT=, the configs' own defaults, the
#            README's quick start and evaluation). Pretraining runs configs/<method>.py:VARIANT and
#            evaluation configs/linear_eval.py:VARIANT, so encoder and data match.
#   STEPS    pretraining steps (train.num_steps of pretraining only; default: the variant's own)
#   EXTRA    more --config.* overrides, applied to pretraining and evaluation alike
#   PYTHON   the Python interpreter (default: python)
#   ARMS     '2d' (default), '3d' or '2d 3d'. The 3D arm reads its own settings: VARIANT_3D (its
#            configs' variant; default none, the 3D configs' own defaults; 'tiny' for a smoke run),
#            EXTRA_3D, METHODS_3D (compare_3d.sh's METHODS), PRETRAIN_STEPS and SEGMENT_STEPS.
set -euo pipefail

out_dir=${1:-runs/compare}
num_seeds=${2:-3}
variant=${VARIANT-compare}
suffix=${variant:+:${variant}}  # configs/x.py:variant, or configs/x.py for the defaults
read -r -a methods <<< "${METHODS:-simclr perscan deepset swav deepcluster_v2}"
python=${PYTHON:-python}

pretrain=()
if [[ -n "${STEPS:-}" ]]; then
  pretrain+=(--config.train.num_steps="${STEPS}")
fi
read -r -a extra <<< "${EXTRA:-}"

read -r -a arms <<< "${ARMS:-2d}"
run_arm() { [[ " ${arms[*]} " == *" $1 "* ]]; }

mkdir -p "${out_dir}"
eval_dirs=()
if run_arm 3d; then
  VARIANT="${VARIANT_3D:-}" EXTRA="${EXTRA_3D:-}" METHODS="${METHODS_3D:-}" PYTHON="${python}" \
    "$(dirname "$0")/compare_3d.sh" "${out_dir}/3d" "${num_seeds}"
  mapfile -t eval_dirs < "${out_dir}/3d/runs.txt"
fi
if run_arm 2d; then
  for seed in $(seq 0 $((num_seeds - 1))); do
    for method in "${methods[@]}"; do
      run="${out_dir}/pretrain/${method}_seed${seed}"
      if [[ ! -f "${run}/backbone.msgpack" ]]; then
        echo "== pretraining ${method}, seed ${seed}"
        "${python}" -m dsset.main --config="configs/${method}.py${suffix}" --workdir="${run}" \
          --config.seed="${seed}" "${pretrain[@]}" "${extra[@]}"
      fi
      echo "== linear probe of ${method}, seed ${seed}"
      "${python}" -m dsset.main --config="configs/linear_eval.py${suffix}" \
        --workdir="${out_dir}/eval/${method}_seed${seed}" --config.init_from="${run}" \
        --config.seed="${seed}" --config.evaluate.level=scan "${extra[@]}"
      eval_dirs+=("${out_dir}/eval/${method}_seed${seed}")
    done
    echo "== linear probe of a random-init encoder, seed ${seed}"
    "${python}" -m dsset.main --config="configs/linear_eval.py${suffix}" \
      --workdir="${out_dir}/eval/random_seed${seed}" --config.init_from= \
      --config.seed="${seed}" --config.evaluate.level=scan "${extra[@]}"
    eval_dirs+=("${out_dir}/eval/random_seed${seed}")
  done
fi

printf '%s\n' "${eval_dirs[@]}" > "${out_dir}/runs.txt"
"${python}" -m dsset.compare "${eval_dirs[@]}" --out="${out_dir}/report.md"
echo "Report: ${out_dir}/report.md"
