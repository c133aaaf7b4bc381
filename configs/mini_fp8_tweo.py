# Miniature GPT (configs/sizes/mini.py), FP8 + TWEO. Run: python train.py configs/mini_fp8_tweo.py
from configs.sizes.mini import *
from configs.modes.fp8_tweo import *

out_dir = 'out/mini_fp8_tweo'
wandb_run_name = 'mini_fp8_tweo'
