# what Slurm does with slurm.sh (below), run here without a cluster: one process per array task, then one report
for task in 0 1; do
    SLURM_ARRAY_TASK_ID=$task SLURM_ARRAY_TASK_COUNT=2 bash slurm.sh > /dev/null 2>&1
done
ls slurm-out
geolie merge slurm-out --out report | tail -n +2 | head -n 6
ls report
