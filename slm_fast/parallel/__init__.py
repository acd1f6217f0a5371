"""Running commands on several processes (torchrun, torch.distributed): joining the process group
(`launch`), the ranks as a team that fails together and shares small values (`team`), and prune as a
pipeline over blocks: slices, hidden-state messages and the pipelined calibration (`pipeline`), the
search's collective sweeps (`scorer`), the boundary-reading baselines (`boundaries`) and the command's
flow (`prune_pipeline`)."""
