import torch.distributed as dist

from lit_internvl.cli import main
from lit_internvl.distributed import leave_process_group

if __name__ == "__main__":
    main()
    if dist.is_available() and dist.is_initialized():
        leave_process_group(0)  # a torchrun/SLURM rank: see leave_process_group for why not the interpreter's exit
