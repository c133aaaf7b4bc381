# Miniature GPT (configs/sizes/mini.py), naive FP8 (per-tensor delayed scaling, emulated on CPU). Run: python train.py configs/mini_fp8.py
from configs.sizes.mini import *
from configs.modes.fp8 import *

out_dir = 'out/mini_fp8'
wandb_run_name = 'mini_fp8'
