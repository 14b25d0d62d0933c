# one node, two processes: rank r audits shard r/2, rank 0 merges (on GPUs each rank takes its LOCAL_RANK's device)
torchrun --standalone --nproc-per-node 2 -m geolie.cli audit --model pair-mlp --data xtb-md/aspirin:test \
    --limit 6 --n-finite 1 --out dist > /dev/null 2>&1
echo "exit status $?"
ls dist
