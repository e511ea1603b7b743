#!/usr/bin/env bash
# Every sub-run of this reproduction, in order (each resumes its own run when run again; the
# mixed DML graphs are in graphs/, the teachers of frozen nodes are added once a search found them):
#   python -m ktg_fast.reproduce --dataset fashion-mnist --models resnet8 resnet14 wrn10_1 --nodes 2 3 --seeds 0 1 2 --epochs 4 --trials 12 --train-subset 10000 --out runs/fashion-mnist-small
set -euo pipefail
cd /work/repro_wt

# Table 1 · ResNet32 (ResNet8) -> runs/fashion-mnist-small/runs/vanilla-resnet8
python -m ktg_fast.train --graph vanilla --model resnet8 --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/vanilla-resnet8 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 1 · ResNet110 (ResNet14) -> runs/fashion-mnist-small/runs/vanilla-resnet14
python -m ktg_fast.train --graph vanilla --model resnet14 --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/vanilla-resnet14 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 1 · WRN28-2 (WRN10-1) -> runs/fashion-mnist-small/runs/vanilla-wrn10_1
python -m ktg_fast.train --graph vanilla --model wrn10_1 --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/vanilla-wrn10_1 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 2 · DML: ResNet8 + ResNet8 -> runs/fashion-mnist-small/runs/dml-resnet8-resnet8
python -m ktg_fast.train --graph dml --nodes 2 --model resnet8 --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/dml-resnet8-resnet8 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# teacher WRN10-1 -> runs/fashion-mnist-small/runs/teacher-wrn10_1
python -m ktg_fast.pretrain --model wrn10_1 --dataset fashion-mnist --epochs 4 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/teacher-wrn10_1 --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 2 · KD (T = 2): ResNet8 + WRN10-1* -> runs/fashion-mnist-small/runs/kd-resnet8-wrn10_1
python -m ktg_fast.train --graph kd --model resnet8 --teacher wrn10_1 --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/kd-resnet8-wrn10_1 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 2 · DML: ResNet8 + WRN10-1 -> runs/fashion-mnist-small/runs/dml-resnet8-wrn10_1
python -m ktg_fast.train --graph runs/fashion-mnist-small/graphs/dml-resnet8-wrn10_1.yaml --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/dml-resnet8-wrn10_1 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# search of 2-node graphs -> runs/fashion-mnist-small/runs/search-2nodes
python -m ktg_fast.search --out runs/fashion-mnist-small/runs/search-2nodes --nodes 2 --target resnet8 --models resnet8 resnet14 wrn10_1 --dataset fashion-mnist --trials 12 --epochs 4 --teachers runs/fashion-mnist-small/teachers --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000
python -m ktg_fast.search export --out runs/fashion-mnist-small/runs/search-2nodes

# Table 2 · Ours: ResNet8 + ? -> runs/fashion-mnist-small/runs/ours-2nodes
python -m ktg_fast.train --graph runs/fashion-mnist-small/runs/search-2nodes/best/graph.yaml --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/ours-2nodes --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 2 · DML: ResNet8 + ResNet8 + ResNet8 -> runs/fashion-mnist-small/runs/dml-resnet8-resnet8-resnet8
python -m ktg_fast.train --graph dml --nodes 3 --model resnet8 --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/dml-resnet8-resnet8-resnet8 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# Table 2 · DML: ResNet8 + WRN10-1 + ResNet8 -> runs/fashion-mnist-small/runs/dml-resnet8-wrn10_1-resnet8
python -m ktg_fast.train --graph runs/fashion-mnist-small/graphs/dml-resnet8-wrn10_1-resnet8.yaml --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/dml-resnet8-wrn10_1-resnet8 --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000

# search of 3-node graphs -> runs/fashion-mnist-small/runs/search-3nodes
python -m ktg_fast.search --out runs/fashion-mnist-small/runs/search-3nodes --nodes 3 --target resnet8 --models resnet8 resnet14 wrn10_1 --dataset fashion-mnist --trials 12 --epochs 4 --teachers runs/fashion-mnist-small/teachers --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000
python -m ktg_fast.search export --out runs/fashion-mnist-small/runs/search-3nodes

# Table 2 · Ours: ResNet8 + ? + ? -> runs/fashion-mnist-small/runs/ours-3nodes
python -m ktg_fast.train --graph runs/fashion-mnist-small/runs/search-3nodes/best/graph.yaml --dataset fashion-mnist --epochs 4 --seeds 0 1 2 --teachers runs/fashion-mnist-small/teachers --out runs/fashion-mnist-small/runs/ours-3nodes --resume --compile-cache runs/fashion-mnist-small/inductor-cache --train-subset 10000
