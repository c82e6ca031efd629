"""Launching a training run: on a SLURM cluster through submitit, as N local processes, or in this
process. The command line is `python launch/submit.py` (or `python -m lowrank_dist.launch`): cli.py.

- resources.py: fit nodes, tasks, CPUs, GPUs and time to the partition; the data workers they feed;
- jobs.py: the SLURM job (submitit) and the local processes (torchrun's launcher), and one line
  for every way a job ends badly;
- slurm.py: what the cluster says (sinfo, sacct/squeue), read without submitit.

Nothing is imported here, so `python -m lowrank_dist.launch` runs its module once."""
