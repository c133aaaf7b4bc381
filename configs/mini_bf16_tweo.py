# Miniature GPT (configs/sizes/mini.py), BF16 + TWEO. Run: python train.py configs/mini_bf16_tweo.py
from configs.sizes.mini import *
from configs.modes.bf16_tweo import *

out_dir = 'out/mini_bf16_tweo'
wandb_run_name = 'mini_bf16_tweo'
