import torch.distributed as dist

from lit_internvl.cli import main

if __name__ == "__main__":
    main()
    # A process of a torchrun/SLURM job tears its process group down before the interpreter exits: left to the
    # interpreter's teardown, gloo's threads are sometimes destroyed while running ("terminate called without an
    # active exception") and the rank exits non-zero after the run has finished and saved.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
