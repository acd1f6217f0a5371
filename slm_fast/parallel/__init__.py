"""Running commands on several processes (torchrun, torch.distributed): joining the process group
(`launch`), and the distributed versions of the commands' work built on it."""
