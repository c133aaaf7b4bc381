# GPT-2 Large (774M), BF16 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_large_bf16_tweo.py
from configs.sizes.gpt2_large import *
from configs.modes.bf16_tweo import *

out_dir = 'out/gpt2_large_bf16_tweo'
wandb_run_name = 'gpt2_large_bf16_tweo'
