#!/usr/bin/env bash
# The README's full-size memory rows: the planner's choice for the memory a card has free at start
# (an 80 GB card ~79 GiB, a 40 GB card ~39 GiB, a 24 GB card ~23 GiB, an 8 GB card ~7.5 GiB), less
# the default reserve (1 GiB + 5%). cin256-v2 architecture (no weights), 256², IPC 10 x 10 classes,
# T=20, DM, fp32, every knob the planner's. Run from the repository root; walks are cached, so the
# budgets share them.
set -euo pipefail
out=benchmarks/results/plan_cards
for budget in 79 39 23 7.5; do
  /usr/bin/time -f "%U user %S sys %e wall" ld3m-fast plan --prior cin256-v2 --res 256 --ipc 10 --steps 20 \
    --algorithm dm --memory-budget ${budget}GiB --json $out/plan_${budget}GiB.json > $out/plan_${budget}GiB.log 2>&1
done
# The decoder in pieces at chain chunk 10 (pure recompute, student micro-batches of 10): one fixed candidate each.
for piece in 10 1; do
  ld3m-fast plan --prior cin256-v2 --res 256 --ipc 10 --steps 20 --algorithm dm --chunk 10 --store-steps 0 \
    --micro-batch 10 --decoder-chunk $piece --memory-budget 200GiB --json $out/chunk10_decoder_$piece.json \
    > $out/chunk10_decoder_$piece.log 2>&1
done
