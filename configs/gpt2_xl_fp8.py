# GPT-2 XL (1.5B), naive FP8 (per-tensor delayed scaling). Run: torchrun --nproc_per_node=8 train.py configs/gpt2_xl_fp8.py
from configs.sizes.gpt2_xl import *
from configs.modes.fp8 import *

out_dir = 'out/gpt2_xl_fp8'
wandb_run_name = 'gpt2_xl_fp8'
