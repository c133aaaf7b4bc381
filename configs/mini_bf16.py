# Miniature GPT (configs/sizes/mini.py), BF16 baseline. Run: python train.py configs/mini_bf16.py
from configs.sizes.mini import *
from configs.modes.bf16 import *

out_dir = 'out/mini_bf16'
wandb_run_name = 'mini_bf16'
