# GPT-2 Large (774M), BF16 baseline. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_large_bf16.py
from configs.sizes.gpt2_large import *
from configs.modes.bf16 import *

out_dir = 'out/gpt2_large_bf16'
wandb_run_name = 'gpt2_large_bf16'
