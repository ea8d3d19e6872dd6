"""Running Parallax under SLURM: rank rendezvous from srun's environment, `parallax submit`, `parallax status`."""
