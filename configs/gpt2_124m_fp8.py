# GPT-2 124M, naive FP8 (per-tensor delayed scaling). Run: torchrun --nproc_per_node=8 train.py configs/gpt2_124m_fp8.py
from configs.sizes.gpt2_124m import *
from configs.modes.fp8 import *

out_dir = 'out/gpt2_124m_fp8'
wandb_run_name = 'gpt2_124m_fp8'
