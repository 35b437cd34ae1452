#!/bin/bash
# DTP-family baselines on real MNIST: one epoch each (two for the FC net), batch 100
# usage: bash bench/dtp_family_mnist.sh   (RUNS=DIR to choose the output folder; reruns skip finished runs)
# then: python bench/dtp_family_table.py runs/dtp-mnist
cd "$(dirname "$0")/.."
mkdir -p "${RUNS:-runs/dtp-mnist}"
for arch in bartunov-mlp bartunov-lc vgg-8-16; do
  ep=1; [ $arch = bartunov-mlp ] && ep=2
  for rule in bp fa dtp sdtp ldrl; do
    out=${RUNS:-runs/dtp-mnist}/$arch-$rule
    [ -f $out/done ] && continue
    /usr/bin/time -f "%e" -o $out.time python run.py --task mnist --arch $arch \
      --rule $rule --epochs $ep --batch-size 100 --angles-every 100 --quiet --out $out && touch $out/done
  done
done
