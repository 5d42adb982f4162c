# Sourced by the comparison scripts (compare_3d.sh, compare_intra_inter.sh): one training or
# evaluation run that is skipped when its folder already holds its result, so an interrupted
# comparison restarts where it stopped. The caller sets `python` and the array `extra`.
# shellcheck shell=bash disable=SC2154
# (SC2154: python and extra are assigned by the caller.)

# run_once CONFIG WORKDIR ARGS...: python -m dsset.main --config=configs/CONFIG (CONFIG is a file
# name with its variant, e.g. segment3d.py:tiny) --workdir=WORKDIR ARGS... "${extra[@]}".
run_once() {
  local config=$1 workdir=$2
  shift 2
  if [[ -f "${workdir}/eval.json" || -f "${workdir}/backbone.msgpack" ]]; then
    return
  fi
  echo "== ${config} -> ${workdir}"
  "${python}" -m dsset.main --config="configs/${config}" --workdir="${workdir}" "$@" \
    "${extra[@]}"
}
