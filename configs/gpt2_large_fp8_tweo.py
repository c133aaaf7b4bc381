# GPT-2 Large (774M), FP8 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_large_fp8_tweo.py
from configs.sizes.gpt2_large import *
from configs.modes.fp8_tweo import *

out_dir = 'out/gpt2_large_fp8_tweo'
wandb_run_name = 'gpt2_large_fp8_tweo'
