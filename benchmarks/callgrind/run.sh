#!/bin/bash
# Instructions per step and per-call setup of gradguide and the diffusers loop (peers suite, cheap
# model, one thread), from callgrind: one pass at 5 and at 45 steps; per step = slope, setup = intercept.
# usage: benchmarks/callgrind/run.sh [SIZE=sd-b1] [GUIDANCE=cfg] [MODEL=cheap|unet]   (needs valgrind and its headers, gcc)
set -e
size=${1:-sd-b1}; guidance=${2:-cfg}; model=${3:-cheap}
here=$(cd "$(dirname "$0")" && pwd); tmp=$(mktemp -d)
gcc -O2 -shared -fPIC -o "$tmp/libcgmark.so" "$here/cgmark.c"
export CGMARK_LIB=$tmp/libcgmark.so OMP_NUM_THREADS=1
for runner in gradguide diffusers model-only; do
  for steps in 5 45; do
    out=$tmp/$runner.$steps.out
    valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no --callgrind-out-file="$out" \
      python "$here/peers_pass.py" $runner "$size" "$guidance" $steps 1 "$model" >/dev/null 2>&1
    eval "ir_${runner//-/_}_${steps}=$(awk '/^summary:/ {print $2}' "$out.1")"
  done
  a=$(eval echo \$ir_${runner//-/_}_5); b=$(eval echo \$ir_${runner//-/_}_45)
  python -c "a, b = $a, $b; s = (b - a) / 40; print(f'$runner $model $size $guidance: {s / 1e3:.0f} k Ir/step, setup {(a - 5 * s) / 1e6:.2f} M Ir/pass, 25-step pass {(25 * s + a - 5 * s) / 1e6:.2f} M')"
done
echo "callgrind files in $tmp (callgrind_annotate --inclusive=yes FILE.1)"
