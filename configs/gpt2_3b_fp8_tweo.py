# GPT-2 3B (2.7B), FP8 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_3b_fp8_tweo.py
from configs.sizes.gpt2_3b import *
from configs.modes.fp8_tweo import *

out_dir = 'out/gpt2_3b_fp8_tweo'
wandb_run_name = 'gpt2_3b_fp8_tweo'
