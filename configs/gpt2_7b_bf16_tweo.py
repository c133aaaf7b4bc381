# GPT-2 7B (6.7B), BF16 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_7b_bf16_tweo.py
from configs.sizes.gpt2_7b import *
from configs.modes.bf16_tweo import *

out_dir = 'out/gpt2_7b_bf16_tweo'
wandb_run_name = 'gpt2_7b_bf16_tweo'
