#!/usr/bin/env bash
# The digits sampler table of the README: proxy FID and share p > 0.9 for every sampler,
# two one-thread evaluations at a time.
# usage: benchmarks/digits_samplers.sh RUN OUT_DIR [short]   (SDDPM=.venv/bin/sddpm picks the CLI)
set -u
RUN=$1; OUT=$2; MODE=${3:-full}
S=${SDDPM:-sddpm}
export OMP_NUM_THREADS=1
mkdir -p $OUT
STATS=$OUT/digits-stats.npz
[ -f $STATS ] || $S fid-stats --dataset digits --features digits --out $STATS > /dev/null
for K in 10 20 50; do
  [ -f $OUT/moments$K.safetensors ] || $S eps-moments --run $RUN --num 1000 --steps $K --out $OUT/moments$K.safetensors > $OUT/moments$K.log 2>&1 &
done
wait
ev() {  # name num sampler steps [extra...]
  local name=$1 num=$2 sampler=$3 steps=$4; shift 4
  [ -f $OUT/$name.json ] || $S evaluate --run $RUN --features digits --stats $STATS --num $num \
     --sampler $sampler --steps $steps --seed 1 --out $OUT/$name.json "$@" > $OUT/$name.log 2>&1
}
jobs_=(
 "ddim50 512 ddim 50"
 "dpm2m5 512 dpm-solver++ 5"
 "dpm2m10 512 dpm-solver++ 10"
 "dpm2m20 512 dpm-solver++ 20"
 "dpm3m5 512 dpm-solver++3m 5"
 "dpm3m10 512 dpm-solver++3m 10"
 "addpm10 512 analytic-ddpm 10 --moments $OUT/moments10.safetensors"
 "addpm20 512 analytic-ddpm 20 --moments $OUT/moments20.safetensors"
 "addpm50 512 analytic-ddpm 50 --moments $OUT/moments50.safetensors"
 "addim10 512 analytic-ddim 10 --moments $OUT/moments10.safetensors"
 "addim20 512 analytic-ddim 20 --moments $OUT/moments20.safetensors"
 "addim50 512 analytic-ddim 50 --moments $OUT/moments50.safetensors"
 "ddpm1000 128 ddpm 1000"
)
[ "$MODE" = short ] && jobs_=("${jobs_[@]:0:6}")
i=0
for j in "${jobs_[@]}"; do
  ev $j &
  i=$((i+1)); if (( i % 2 == 0 )); then wait; fi
done
wait
echo "done: $OUT"
