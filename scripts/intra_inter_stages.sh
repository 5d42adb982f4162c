#!/usr/bin/env bash
# Intra-inter clustering's released schedule (Nguyen et al.): stage 1 (2D SwAV on slices), stage 2
# (masked slice-embedding prediction, encoder frozen) from stage 1's export, stage 3 (3D cluster
# agreement) from stage 2's. Each stage runs in OUT_DIR/stage<N>; a stage whose workdir holds its
# export is skipped, and one with a checkpoint but no export resumes. See configs/intra_inter.py.
#
# Usage: scripts/intra_inter_stages.sh [OUT_DIR]
#   OUT_DIR  folder of the three runs (default: runs/intra_inter)
# Environment:
#   VARIANT  size of every stage: '' (default: this CPU), 'paper', 'compare' or 'tiny' (smoke run)
#   EXTRA    more --config.* overrides, applied to every stage (data and encoder must match)
#   PYTHON   the Python interpreter (default: python)
set -euo pipefail

out_dir=${1:-runs/intra_inter}
size=${VARIANT:+,${VARIANT}}
python=${PYTHON:-python}
read -r -a extra <<< "${EXTRA:-}"

mkdir -p "${out_dir}"
init_from=""
for stage in 1 2 3; do
  workdir="${out_dir}/stage${stage}"
  if [[ ! -f "${workdir}/backbone.msgpack" ]]; then
    echo "== stage ${stage} -> ${workdir}"
    "${python}" -m dsset.main --config="configs/intra_inter.py:stage${stage}${size}" \
      --workdir="${workdir}" --config.init_from="${init_from}" "${extra[@]}"
  fi
  init_from=${workdir}
done
echo "Encoder, slice embedding and transformer: ${out_dir}/stage3"
