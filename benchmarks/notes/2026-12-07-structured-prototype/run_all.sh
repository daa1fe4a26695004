#!/bin/bash
# The commands that produce the tables in the report (one job at a time, 1 thread each).
cd /work/scratch/scale
. /work/main/.venv/bin/activate
export PYTHONPATH=/work/scratch/scale OMP_NUM_THREADS=1
B="python bench_scale.py table --out results.jsonl"
$B --model hier --D 100 --guides structured autonormal lowrank iaf autoflow --steps 1500
$B --model hier --D 10000 --guides structured --steps 3000 --draws 1000 --khat-draws 200
$B --model hier --D 10000 --guides autonormal lowrank --steps 1000 --draws 1000 --khat-draws 200
$B --model hier --D 100000 --guides structured autonormal --steps 500 --draws 1000 --khat-draws 100
$B --model hier --D 100000 --guides lowrank --steps 60 --accuracy 0
$B --model hier --D 1000 --guides structured autonormal lowrank iaf --steps 1500 --draws 2000 --khat-draws 500
$B --model sv --D 100 --guides iaf autoflow --steps 1500
$B --model sv --D 10000 100000 --guides structured autonormal lowrank --steps 60 --accuracy 0
python bench_scale.py ref --D 1000 --nuts 3000 500
$B --model sv --D 1000 --guides structured autonormal lowrank iaf --steps 1500 --draws 2000 --khat-draws 500
