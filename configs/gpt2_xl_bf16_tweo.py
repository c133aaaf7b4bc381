# GPT-2 XL (1.5B), BF16 + TWEO. Run: torchrun --nproc_per_node=8 train.py configs/gpt2_xl_bf16_tweo.py
from configs.sizes.gpt2_xl import *
from configs.modes.bf16_tweo import *

out_dir = 'out/gpt2_xl_bf16_tweo'
wandb_run_name = 'gpt2_xl_bf16_tweo'
