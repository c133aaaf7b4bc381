# GPT-2 Medium (350M), BF16 baseline. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_medium_bf16.py
from configs.sizes.gpt2_medium import *
from configs.modes.bf16 import *

out_dir = 'out/gpt2_medium_bf16'
wandb_run_name = 'gpt2_medium_bf16'
