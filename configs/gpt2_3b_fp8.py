# GPT-2 3B (2.7B), naive FP8 (per-tensor delayed scaling). Run: torchrun --nproc_per_node=8 train.py configs/gpt2_3b_fp8.py
from configs.sizes.gpt2_3b import *
from configs.modes.fp8 import *

out_dir = 'out/gpt2_3b_fp8'
wandb_run_name = 'gpt2_3b_fp8'
