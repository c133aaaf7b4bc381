# GPT-2 7B (6.7B), FP8 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_7b_fp8_tweo.py
from configs.sizes.gpt2_7b import *
from configs.modes.fp8_tweo import *

out_dir = 'out/gpt2_7b_fp8_tweo'
wandb_run_name = 'gpt2_7b_fp8_tweo'
