# GPT-2 XL (1.5B), FP8 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_xl_fp8_tweo.py
from configs.sizes.gpt2_xl import *
from configs.modes.fp8_tweo import *

out_dir = 'out/gpt2_xl_fp8_tweo'
wandb_run_name = 'gpt2_xl_fp8_tweo'
