#!/bin/bash
#SBATCH --job-name=geolie-audit
#SBATCH --array=0-1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
# sbatch slurm.sh: each array task audits its shard (I and N from SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT);
# --resume lets a task that was preempted continue where it stopped; then: geolie merge slurm-out --out report
geolie audit --model pair-mlp --data xtb-md/aspirin:test --limit 6 --n-finite 1 --shard slurm --resume \
    --out slurm-out
